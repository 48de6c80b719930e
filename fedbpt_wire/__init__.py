"""Wire schemas and the tensor codec shared by the service, the clients and the aggregator.

Kept free of torch and transformers so a client installs only numpy, pydantic and httpx.
"""

import warnings

# cma warns at import where matplotlib is missing (the aggregator's and the clients' images): only its plots need
# it, and no user of the stack can act on the warning. Every role imports this package before cma.
warnings.filterwarnings("ignore", message="Could not import matplotlib")
