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
from fedbpt_wire.served import ServedChoice
from fedbpt_wire.tensors import TensorDecodeError, decode_tensor, encode_tensor

from .tasks import Task, TaskSpecError, task_from_spec, with_placement

# /2 adds what is served (the tuned soft prompt or the template alone) and the read-out's label bias: a /1 reader
# would serve z where a /2 file serves the template alone, so the version changes.
PROMPT_FORMAT = "fedbpt-prompt/2"
READABLE_FORMATS = ("fedbpt-prompt/1", PROMPT_FORMAT)


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class TunedPrompt:
    model: dict  # name, hidden_size, kind
    config: RunConfig
    task: Task  # as written by its owner; `placed` is what the service is sent
    z: np.ndarray  # [d] float32: the tuned prompt, or under `served == "baseline"` the best tuned candidate
    metrics: dict
    served: str = "tuned"  # "tuned": the soft prompt from z; "baseline": the template alone, no soft prompt
    bias: np.ndarray | None = None  # [C] added to the label-word logits before the read-out (None: none)
    selection: dict | None = None  # why `served` was chosen: the validation comparison (fedbpt_wire.served)

    @property
    def placed(self) -> Task:
        return with_placement(self.task, self.config.prompt_placement)

    @property
    def served_z(self) -> np.ndarray | None:
        return self.z if self.served == "tuned" else None

    def read_out(self, logits: np.ndarray) -> np.ndarray:
        """Label-word logits [..., C] as the prompt's classifier reads them: its bias added."""
        logits = np.asarray(logits, dtype=np.float64)
        return logits if self.bias is None else logits + self.bias

    def check_model(self, info: ModelInfo) -> None:
        """A prompt lives in one model's embedding space: elsewhere it means nothing."""
        if info.name != self.model["name"] or info.hidden_size != self.model["hidden_size"]:
            raise PromptFileError(
                f"this prompt was tuned on {self.model['name']} (hidden size "
                f"{self.model['hidden_size']}), the service serves {info.name} (hidden size "
                f"{info.hidden_size}): use a service of the model it was tuned on"
            )


def prompt_payload(
    info: ModelInfo,
    config: RunConfig,
    task: Task,
    z: np.ndarray,
    metrics: dict,
    created_by: str,
    *,
    choice: ServedChoice,
    bias: np.ndarray,
) -> dict:
    if len(bias) != task.num_classes:
        raise ValueError(f"bias has {len(bias)} values for {task.num_classes} classes")
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
            "basis": config.projection_basis,
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
        "served": choice.served,
        "bias": [float(b) for b in bias],
        "selection": choice.model_dump(mode="json", exclude={"mean"}),
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
    if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise PromptFileError(f"{path}: not a {' or '.join(READABLE_FORMATS)} prompt file (format {found!r})")
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
    # /1 files predate both: they serve z, read out without a bias.
    served = payload.get("served", "tuned")
    if served not in ("tuned", "baseline"):
        raise PromptFileError(f"{path}: served must be 'tuned' or 'baseline', got {served!r}")
    bias = None
    if payload.get("bias") is not None:
        try:
            bias = np.asarray(payload["bias"], dtype=np.float64)
        except (TypeError, ValueError):
            bias = None
        if bias is None or bias.shape != (task.num_classes,) or not np.isfinite(bias).all():
            raise PromptFileError(f"{path}: bias must be a list of {task.num_classes} finite numbers, one per label")
    if z.shape != (config.intrinsic_dim,):
        raise PromptFileError(f"{path}: z has shape {list(z.shape)}, the run's intrinsic_dim is {config.intrinsic_dim}")
    return TunedPrompt(model, config, task, z, payload.get("metrics") or {}, served, bias, payload.get("selection"))
