"""The tuned prompt as a file to keep and use (`fedbpt-prompt/1`, docs/formats.md).

Self-contained: the model it was tuned on, the projection that maps z to the soft prompt (its seed, d, L,
sigma0, init and placement), z itself, the task (template and label words), the run's config and the final
validation metrics. `fedbpt predict` and `fedbpt evaluate` need nothing else but the service.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from fedbpt_wire.federation import RunConfig
from fedbpt_wire.schemas import ModelInfo, Tensor
from fedbpt_wire.tensors import TensorDecodeError, decode_tensor, encode_tensor

from .tasks import Task, TaskSpecError, task_from_spec, with_placement

PROMPT_FORMAT = "fedbpt-prompt/1"


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class TunedPrompt:
    model: dict  # name, hidden_size, kind
    config: RunConfig
    task: Task  # as written by its owner; `placed` is what the service is sent
    z: np.ndarray  # [d] float32
    metrics: dict

    @property
    def placed(self) -> Task:
        return with_placement(self.task, self.config.prompt_placement)

    def check_model(self, info: ModelInfo) -> None:
        """A prompt lives in one model's embedding space: elsewhere it means nothing."""
        if info.name != self.model["name"] or info.hidden_size != self.model["hidden_size"]:
            raise PromptFileError(
                f"this prompt was tuned on {self.model['name']} (hidden size "
                f"{self.model['hidden_size']}), the service serves {info.name} (hidden size "
                f"{info.hidden_size}): use a service of the model it was tuned on"
            )


def prompt_payload(
    info: ModelInfo, config: RunConfig, task: Task, z: np.ndarray, metrics: dict, created_by: str
) -> dict:
    return {
        "format": PROMPT_FORMAT,
        "created_by": created_by,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"name": info.name, "hidden_size": info.hidden_size, "kind": info.kind},
        "projection": {
            "seed": config.projection_seed,
            "intrinsic_dim": config.intrinsic_dim,
            "prompt_length": config.prompt_length,
            "sigma0": config.sigma0,
            "init": config.prompt_init,
            "placement": config.prompt_placement,
        },
        "z": encode_tensor(np.asarray(z, dtype=np.float32)).model_dump(),
        # `task` as the first files had it (the template placed for the model); `task_spec` the whole spec.
        "task": {
            "name": task.name,
            "template": with_placement(task, config.prompt_placement).template(info.kind),
            "label_words": list(task.label_words),
        },
        "task_spec": task.to_spec(),
        "run_config": config.model_dump(),
        "metrics": metrics,
    }


def write_prompt(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)  # never half a prompt file where a good one was
    return path


def read_prompt(path: str | Path) -> TunedPrompt:
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PromptFileError(f"{path}: cannot read the prompt file ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise PromptFileError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(payload, dict) or payload.get("format") != PROMPT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise PromptFileError(f"{path}: not a {PROMPT_FORMAT} prompt file (format {found!r})")
    try:
        config = RunConfig.model_validate(payload["run_config"])
        z = decode_tensor(Tensor.model_validate(payload["z"]), "z").astype(np.float32)
        model = {k: payload["model"][k] for k in ("name", "hidden_size", "kind")}
        if "task_spec" in payload:
            task = task_from_spec(payload["task_spec"], f"{path}: task_spec")
        else:
            # The demo's first files carried the placed template and the words only: classes are their indices.
            words = payload["task"]["label_words"]
            task = task_from_spec(
                {
                    "name": payload["task"]["name"],
                    "template": payload["task"]["template"],
                    "label_words": {str(i): w for i, w in enumerate(words)},
                },
                f"{path}: task",
            )
    except KeyError as exc:
        raise PromptFileError(f"{path}: missing field {exc}") from None
    except (ValidationError, TensorDecodeError, TypeError) as exc:
        raise PromptFileError(f"{path}: invalid field ({str(exc).splitlines()[0]})") from None
    except TaskSpecError as exc:
        raise PromptFileError(str(exc)) from None
    if z.shape != (config.intrinsic_dim,):
        raise PromptFileError(f"{path}: z has shape {list(z.shape)}, the run's intrinsic_dim is {config.intrinsic_dim}")
    return TunedPrompt(model, config, task, z, payload.get("metrics") or {})
