"""What a client checks before it joins a run: the service answers, takes its key, and can score its task.

A wrong key or an unusable label word used to surface only when the client was first selected, a round later,
and then as a failed round; one tiny score (one text, the bare template) finds both at once.
"""

from __future__ import annotations

import httpx
import numpy as np

from fedbpt_wire.schemas import ModelInfo

from .errors import FatalError, service_refused, unreachable
from .http import RequestFailed
from .service_client import ServiceClient
from .tasks import Task


def check_service(service: ServiceClient, task: Task) -> ModelInfo:
    url = service.http.base_url
    try:
        info = service.model_info()
        text = task.render({f: "ok" for f in task.fields}, info.kind)
        service.score(np.zeros((1, 0, info.hidden_size), np.float32), [text], list(task.label_words))
    except (httpx.TransportError, httpx.TimeoutException) as exc:
        raise unreachable("service", url, exc) from None
    except RequestFailed as exc:
        if exc.status == 422 and "label_words" in exc.detail:
            raise FatalError(
                f"task {task.name}: the served model {info.name} cannot use these label words "
                f"({exc.detail}); each must be one token of its vocabulary, usually with its leading "
                "space: change label_words in the task spec (or --label-words)"
            ) from None
        raise service_refused(url, exc) from None
    return info
