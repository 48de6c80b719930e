"""`python -m aggregator ...`: the same flags as `fedbpt aggregator`."""

import argparse
import sys

from .cli import add_arguments, run

parser = argparse.ArgumentParser(prog="python -m aggregator", description="FedBPT aggregator")
add_arguments(parser)
sys.exit(run(parser.parse_args()))
