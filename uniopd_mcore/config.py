"""The job configuration: one dataclass per concern, loaded from YAML, overridable per key.

    cfg = load_config("examples/configs/demo_cpu.yaml", ["recipe.margin=0.5", "--trainer.steps=10"])

Precedence is dataclass defaults < YAML file < overrides (``section.key=value``, a leading ``--``
is accepted; list entries are addressed as ``teachers.0.servers=[...]``). OmegaConf checks key
names and types while merging; :func:`validate` then checks choices, ranges and cross-section
consistency in one place, so a bad configuration fails at start with a message that names the key.
The caller gets plain dataclass instances, never a DictConfig.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import tempfile
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "JobConfig", "LoggingConfig", "ModelConfig",
    "OptimizerConfig", "ParallelConfig", "RecipeConfig", "RolloutConfig", "SGLangConfig",
    "SourceConfig", "TeacherConfig", "TrainerConfig", "load_config", "save_config", "to_yaml",
    "validate",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the full key, the value and what is expected."""


def _choice(default: str, *allowed: str) -> Any:
    # String enum: the allowed values live in the field's metadata and validate() checks them.
    assert default in allowed
    return field(default=default, metadata={"choices": allowed})


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    student: str = ""
    """Hugging Face checkpoint directory of the student (config.json, tokenizer, safetensors).
    The learner is built from it and the rollout engine starts from its weights."""

    dtype: str = _choice("bfloat16", "bfloat16", "float32", "float16")
    """Parameter/compute dtype of the learner and the rollout engine (optimizer state is fp32)."""

    attention_backend: str = _choice("auto", "auto", "sdpa", "flash", "te")
    """Core attention: 'te' (Transformer Engine), 'flash' (flash-attn), 'sdpa' (torch; the CPU
    path), or 'auto' (the best one installed)."""

    recompute: str = _choice("none", "none", "full")
    """Activation recomputation of the learner: 'full' recomputes every layer in backward."""

    seed: int = 1234
    """Seed of the learner (parameter init of anything not loaded, dropout)."""


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """Megatron tensor-parallel size; must divide the student's attention and KV head counts."""

    pipeline_model_parallel_size: int = 1
    """Megatron pipeline-parallel size; at most the student's number of layers."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tensor_model_parallel_size > 1)."""

    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron distributed optimizer)."""

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel size of a job of ``world_size`` ranks: world / (TP x PP)."""
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world_size < 1 or world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not a multiple of tensor_model_parallel_size x "
                f"pipeline_model_parallel_size = {self.tensor_model_parallel_size} x "
                f"{self.pipeline_model_parallel_size} = {model_parallel}")
        return world_size // model_parallel


@dataclass
class SGLangConfig:
    mem_fraction_static: float = 0.75
    """Fraction of GPU memory SGLang reserves for weights and KV cache (SGLang's own option)."""

    num_engines: int = 1
    """Number of SGLang rollout engines."""

    tp_size: int = 1
    """Tensor-parallel size of each engine (GPUs per engine)."""

    host: str = "127.0.0.1"
    """Address the engines bind to; keep the loopback unless other hosts must reach them."""

    base_port: int = 30000
    """Port of engine 0; engine i listens on base_port + i."""

    extra_args: dict[str, str] = field(default_factory=dict)
    """Further SGLang server arguments, e.g. {chunked_prefill_size: "4096"} -> --chunked-prefill-size 4096."""


@dataclass
class RolloutConfig:
    engine: str = _choice("embedded", "embedded", "sglang")
    """'embedded': in-process Hugging Face generation (CPU or one GPU); 'sglang': SGLang engines
    that receive the learner's weights after every step."""

    n_samples_per_prompt: int = 16
    """Rollouts per prompt, i.e. the group size G of the margin statistics."""

    temperature: float = 1.0
    """Sampling temperature (0 = greedy). On-policy distillation samples at 1."""

    top_p: float = 1.0
    """Nucleus sampling threshold in (0, 1]."""

    max_prompt_len: int = 4096
    """Prompts longer than this many tokens are dropped when the data is loaded."""

    max_response_len: int = 16384
    """Maximum number of generated tokens per rollout."""

    colocate: bool = True
    """Rollout engines share the learner's GPUs (memory released/resumed around each phase)."""

    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    """Options of the SGLang engines (used when engine = 'sglang')."""


@dataclass
class TeacherConfig:
    name: str = ""
    """Name that data.sources uses to route a prompt to this teacher."""

    engine: str = _choice("embedded", "embedded", "sglang", "cache")
    """'embedded': in-process Hugging Face model; 'sglang': a pool of SGLang servers;
    'cache': teacher log-probs precomputed offline."""

    model_path: str = ""
    """HF checkpoint of the teacher (embedded; sglang: checked against each server's model and
    used to launch a local server when 'servers' is empty); for 'cache', the cache directory."""

    servers: list[str] = field(default_factory=list)
    """Base URLs of running SGLang servers (http://host:port), used round-robin."""

    max_retries: int = 5
    """Retries of a failed scoring request before its tokens get the -100 sentinel."""

    timeout_s: float = 45.0
    """Timeout of one scoring request, in seconds."""

    max_in_flight: int = 64
    """Concurrent scoring requests to this teacher, over all its servers."""


@dataclass
class SourceConfig:
    teacher: str = ""
    """Name of the teacher (teachers[*].name) that scores prompts of this source."""

    verifier: str = "math"
    """Outcome verifier (uniopd_mcore.rewards registry name, or 'package.module:function')."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Training prompts: JSONL or Parquet files with fields prompt, answer, source."""

    eval_files: list[str] = field(default_factory=list)
    """Evaluation prompts, same format."""

    sources: dict[str, SourceConfig] = field(default_factory=dict)
    """Per data source (the 'source' field of a record): its teacher and its verifier."""

    shuffle: bool = True
    """Shuffle the training prompts every epoch."""

    seed: int = 0
    """Seed of the shuffling."""

    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of the tokenizer's chat template, e.g. {enable_thinking: false}."""

    offline_balance: bool = False
    """Before training, estimate each prompt's pass rate with the student and upsample
    mid-difficulty prompts toward a flat pass-rate histogram (written to balanced_file)."""

    balanced_file: str = ""
    """Output of the offline balancer (empty: <logging.run_dir>/balanced_train.jsonl)."""

    offline_samples_per_prompt: int = 8
    """Student rollouts per prompt used to estimate its pass rate."""

    offline_max_repeat: int = 8
    """Largest number of copies of one prompt in the balanced file."""


@dataclass
class RecipeConfig:
    margin: float = 0.4
    """Order-consistency margin delta between correct and incorrect sequence returns."""

    statistic: str = _choice("mean", "mean", "minmax")
    """Group gap: mean(G_correct) - mean(G_incorrect), or min(G_correct) - max(G_incorrect)."""

    direction: str = _choice("both", "both", "correct_up", "incorrect_down")
    """Which sequences a margin shift moves: both (+s/2, -s/2), correct (+s) or incorrect (-s)."""

    calibration: str = _choice("shift", "shift", "greedy_mask", "none")
    """Fix of violated groups: additive margin shift, greedy masking of outliers, or none (plain OPD)."""

    min_retain_ratio: float = 0.25
    """greedy_mask keeps at least this fraction of each class of a group."""

    online_balance: bool = True
    """Mask a random subset of the majority class of mixed groups (correct:incorrect = balance_ratio)."""

    balance_ratio: float = 1.0
    """Target correct:incorrect ratio of the online balancing."""

    eps_low: float = 0.2
    """PPO clip: lower bound of the ratio is 1 - eps_low."""

    eps_high: float = 0.28
    """PPO clip: upper bound of the ratio is 1 + eps_high."""

    teacher_gap_clip: float = 10.0
    """Tokens with |logp_student - logp_teacher| >= this get no loss."""

    backend: str = _choice("torch", "torch", "triton", "auto")
    """Advantage computation: plain torch reference, Triton kernel, or Triton when it can run."""


@dataclass
class OptimizerConfig:
    name: str = _choice("adam", "adam", "sgd")
    """Megatron optimizer: "adam" (decoupled weight decay, the recipe's) or "sgd" (momentum 0.9)."""

    lr: float = 1e-6
    """Peak learning rate."""

    min_lr: float = 0.0
    """Final learning rate of the cosine schedule."""

    warmup_steps: int = 5
    """Linear warm-up steps from 0 to lr."""

    lr_schedule: str = _choice("constant", "constant", "cosine")
    """Learning-rate schedule after warm-up."""

    weight_decay: float = 0.1
    """Decoupled weight decay."""

    adam_beta1: float = 0.9
    """Adam beta1."""

    adam_beta2: float = 0.98
    """Adam beta2."""

    adam_eps: float = 1e-8
    """Adam epsilon."""

    clip_grad: float = 1.0
    """Gradient-norm clipping threshold (0 disables clipping)."""


@dataclass
class TrainerConfig:
    steps: int = 50
    """Optimisation steps (one rollout of prompts_per_step prompts per step)."""

    prompts_per_step: int = 64
    """Prompts sampled per step; each yields rollout.n_samples_per_prompt sequences."""

    max_tokens_per_micro_batch: int = 16384
    """Token budget of one packed micro-batch per data-parallel rank."""

    global_batch_sequences: int | None = None
    """Sequences per optimizer update (default: prompts_per_step x n_samples_per_prompt, one
    update per rollout). Must divide the sequences of a step."""

    eval_every: int = 0
    """Evaluate every this many steps (0: never)."""

    eval_prompts: int = 0
    """Evaluation prompts per evaluation (0: all of data.eval_files)."""

    seed: int = 0
    """Seed of rollout sampling and online balancing."""


@dataclass
class CheckpointConfig:
    dir: str = ""
    """Checkpoint directory (empty: <logging.run_dir>/checkpoints)."""

    save_every: int = 5
    """Save every this many steps (0: only at the end)."""

    resume: bool = False
    """Resume from the newest checkpoint in dir when there is one."""

    keep_last: int = 3
    """Keep this many newest checkpoints (0: keep all)."""


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    """Directory of this run: saved config, metrics, checkpoints by default."""

    tensorboard: bool = True
    """Write TensorBoard event files under run_dir/tensorboard."""

    jsonl: bool = True
    """Write one JSON line of metrics per step to run_dir/metrics.jsonl."""

    progress: bool = True
    """Show a progress bar on rank 0."""


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The student model."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Learner parallelism."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling of the student's rollouts."""

    teachers: list[TeacherConfig] = field(default_factory=list)
    """Teachers, referenced by name from data.sources."""

    data: DataConfig = field(default_factory=DataConfig)
    """Prompts, data sources and offline balancing."""

    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    """The Uni-OPD recipe: margin calibration, online balancing and the loss."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Adam and its learning-rate schedule."""

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The training loop."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resumption."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Run directory and metric sinks."""


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Defaults < YAML file at ``path`` < ``overrides``; derived defaults filled in; validated."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(JobConfig)
    if path is not None:
        where = f"config file '{path}'"
        if not os.path.isfile(path):
            raise ConfigError(f"{where} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml.YAMLError and friends
            raise ConfigError(f"{where} is not valid YAML: {e}") from None
        if loaded is None or (hasattr(loaded, "is_empty") and loaded.is_empty()):
            loaded = OmegaConf.create({})
        if not OmegaConf.is_dict(loaded):
            raise ConfigError(f"{where} must hold a mapping of sections (model:, rollout:, ...), "
                              f"got a {type(OmegaConf.to_container(loaded)).__name__}")
        _check_entries(OmegaConf.to_container(loaded, resolve=False), JobConfig, "", where)
        cfg = _guarded(lambda: OmegaConf.merge(cfg, loaded), where, None)
    for item in overrides:
        cfg = _apply_override(cfg, item)
    job = _guarded(lambda: OmegaConf.to_object(cfg), "configuration", None)
    fill_derived(job)
    validate(job)
    return job


def _apply_override(cfg: Any, item: str) -> Any:
    from omegaconf import OmegaConf

    where = f"override '{item}'"
    text = item[2:] if item.startswith("--") else item
    key, sep, _ = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{where} must look like section.key=value")
    parsed = _guarded(lambda: OmegaConf.from_dotlist([text]), where, key)
    segments = _split_key(key)
    if any(s.isdigit() for s in segments):
        # from_dotlist turns "teachers.0.name" into a dict keyed "0", which cannot merge into a
        # list; assign the element in place instead (it must exist).
        value = OmegaConf.to_container(parsed)
        for s in segments:
            value = value[s]
        _check_list_indices(cfg, segments, where)

        def assign() -> Any:
            OmegaConf.update(cfg, ".".join(segments), value, merge=True)
            return cfg

        return _guarded(assign, where, key)
    _check_entries(OmegaConf.to_container(parsed, resolve=False), JobConfig, "", where)
    return _guarded(lambda: OmegaConf.merge(cfg, parsed), where, key)


def _check_entries(data: Any, t: Any, prefix: str, where: str) -> None:
    """Merge every list/dict entry of a dataclass type on its own before the real merge.

    OmegaConf reports errors inside such entries relative to the entry ("max_retries" for
    "teachers.0.max_retries"); checking each entry alone lets the message carry the full key.
    """
    from omegaconf import OmegaConf

    if dataclasses.is_dataclass(t):
        if isinstance(data, dict):
            hints = typing.get_type_hints(t)
            for k, v in data.items():
                if k in hints:
                    _check_entries(v, hints[k], f"{prefix}{k}.", where)
        return
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is list and isinstance(data, list):
        elem, items = args[0], list(enumerate(data))
    elif origin is dict and isinstance(data, dict):
        elem, items = args[1], list(data.items())
    else:
        return
    if not dataclasses.is_dataclass(elem):
        return
    for k, v in items:
        entry = f"{prefix}{k}."
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: {entry[:-1]}: expected {_type_name(elem)}, got {v!r}")
        _guarded(lambda: OmegaConf.merge(OmegaConf.structured(elem), v), where, None, prefix=entry)
        _check_entries(v, elem, entry, where)


def _split_key(key: str) -> list[str]:
    return [s for s in re.split(r"[.\[\]]", key) if s]


def _check_list_indices(cfg: Any, segments: list[str], where: str) -> None:
    from omegaconf import OmegaConf

    node = cfg
    for i, s in enumerate(segments):
        if OmegaConf.is_list(node):
            if not s.isdigit() or int(s) >= len(node):
                name = ".".join(segments[:i])
                raise ConfigError(
                    f"{where}: {name} has {len(node)} entries, so index {s} does not exist "
                    f"(to add entries override the whole list, e.g. {name}=[{{name: t1}}, {{name: t2}}])")
            node = node[int(s)]
        elif OmegaConf.is_dict(node) and s in node:
            node = node._get_node(s)
        else:
            return  # an unknown key: the assignment reports it


def _guarded(fn: Any, where: str, override_key: str | None, prefix: str = "") -> Any:
    """Run an OmegaConf operation, turning its errors into ConfigError messages with full keys.

    ``prefix`` is prepended to OmegaConf's key when ``fn`` works on a detached list/dict entry.
    """
    from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, MissingMandatoryValue
    from omegaconf.errors import OmegaConfBaseException, ValidationError

    try:
        return fn()
    except ConfigError:
        raise
    except (ConfigKeyError, AttributeError, KeyError) as e:
        full_key = _full_key(e, override_key, prefix)
        raise ConfigError(f"{where}: {_unknown_key_message(full_key)}") from None
    except ValidationError as e:
        full_key = _full_key(e, override_key, prefix)
        expected = _describe_type(full_key)
        value = getattr(e, "value", None)
        if value is None or "not Optional" in str(e) or "Incompatible value 'None'" in str(e):
            shown = "null"
        else:
            shown = repr(_plain(value))
        raise ConfigError(f"{where}: {full_key}: expected {expected}, got {shown}") from None
    except (InterpolationResolutionError, MissingMandatoryValue) as e:
        raise ConfigError(f"{where}: {_full_key(e, override_key, prefix)}: {_first_line(e)}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {_full_key(e, override_key, prefix)}: {_first_line(e)}") from None
    except TypeError as e:  # e.g. merging a mapping into a list
        key = override_key or "?"
        raise ConfigError(f"{where}: {key}: expected {_describe_type(key)} ({e})") from None


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _full_key(e: BaseException, override_key: str | None, prefix: str = "") -> str:
    key = ".".join(_split_key(prefix + (getattr(e, "full_key", None) or "")))
    if override_key is None:
        return key or "?"
    override_key = ".".join(_split_key(override_key))
    # Inside dict-of-dataclass entries OmegaConf loses the parent path ("math" instead of
    # "data.sources.math"); unless its key extends the override's, the override names it better.
    return key if key.startswith(override_key) else override_key


def _resolve_type(key: str) -> tuple[Any, tuple[str, ...] | None]:
    """(type, allowed values) of a dotted key of JobConfig; type None when there is no such key."""
    t: Any = JobConfig
    choices = None
    for s in _split_key(key):
        origin = typing.get_origin(t)
        if dataclasses.is_dataclass(t):
            fields = {f.name: f for f in dataclasses.fields(t)}
            if s not in fields:
                return None, None
            choices = fields[s].metadata.get("choices")
            t = typing.get_type_hints(t)[s]
        elif origin is list and s.isdigit():
            t, choices = typing.get_args(t)[0], None
        elif origin is dict:
            t, choices = typing.get_args(t)[1], None
        else:
            return None, None
    return t, choices


def _type_name(t: Any) -> str:
    if dataclasses.is_dataclass(t):
        return f"a mapping with keys {[f.name for f in dataclasses.fields(t)]}"
    if isinstance(t, type):
        return t.__name__
    # "list[uniopd_mcore.config.TeacherConfig]" -> "list[TeacherConfig]"
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", str(t))


def _describe_type(key: str) -> str:
    t, choices = _resolve_type(key)
    if t is None:
        return "a known key"
    if choices:
        return f"one of {list(choices)}"
    return _type_name(t)


def _unknown_key_message(full_key: str) -> str:
    segments = _split_key(full_key)
    # The deepest prefix that exists names the section whose keys we list.
    for n in range(len(segments), 0, -1):
        t, _ = _resolve_type(".".join(segments[:n]))
        if t is not None:
            break
    else:
        n, t = 0, JobConfig
    if n == len(segments):
        return f"'{full_key}' cannot be set here"
    section = ".".join(segments[:n])
    known = [f.name for f in dataclasses.fields(t)] if dataclasses.is_dataclass(t) else []
    bad = segments[n]
    msg = f"unknown key '{full_key}'"
    close = difflib.get_close_matches(bad, known, n=1)
    if close:
        msg += f"; did you mean '{'.'.join(segments[:n] + [close[0]])}'?"
    where = f"{section} has" if section else "top-level sections are"
    return msg + (f" ({where}: {', '.join(known)})" if known else "")


# ---------------------------------------------------------------------------------------------
# Derived values and validation
# ---------------------------------------------------------------------------------------------


def fill_derived(cfg: JobConfig) -> JobConfig:
    """Fill the defaults that depend on other keys (in place), so that the saved config is explicit."""
    if cfg.trainer.global_batch_sequences is None:
        cfg.trainer.global_batch_sequences = cfg.trainer.prompts_per_step * cfg.rollout.n_samples_per_prompt
    if not cfg.checkpoint.dir:
        cfg.checkpoint.dir = os.path.join(cfg.logging.run_dir, "checkpoints")
    if not cfg.data.balanced_file:
        cfg.data.balanced_file = os.path.join(cfg.logging.run_dir, "balanced_train.jsonl")
    return cfg


def _choice_problems(obj: Any, prefix: str) -> list[str]:
    problems = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        allowed = f.metadata.get("choices")
        if allowed and value not in allowed:
            problems.append(f"{key}: {value!r} is not one of {list(allowed)}")
        if dataclasses.is_dataclass(value):
            problems += _choice_problems(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    problems += _choice_problems(item, f"{key}.{i}.")
        elif isinstance(value, dict):
            for k, item in value.items():
                if dataclasses.is_dataclass(item):
                    problems += _choice_problems(item, f"{key}.{k}.")
    return problems


def _student_config(path: str) -> dict[str, Any] | None:
    """The student's config.json, or None when the directory does not exist yet."""
    if not path or not os.path.isdir(path):
        return None
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ConfigError(f"model.student: '{path}' has no config.json (expected a Hugging Face checkpoint directory)")
    try:
        with open(cfg_file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"model.student: cannot read '{cfg_file}': {e}") from None


def validate(cfg: JobConfig, *, world_size: int | None = None) -> None:
    """Check choices, ranges and cross-key consistency; raise one ConfigError listing every problem."""
    from uniopd_mcore.rewards.registry import check_verifier_name

    p: list[str] = _choice_problems(cfg, "")

    def need(ok: bool, msg: str) -> None:
        if not ok:
            p.append(msg)

    # parallel vs. the student's architecture
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    need(tp >= 1, f"parallel.tensor_model_parallel_size: must be >= 1, got {tp}")
    need(pp >= 1, f"parallel.pipeline_model_parallel_size: must be >= 1, got {pp}")
    need(not par.sequence_parallel or tp > 1,
         "parallel.sequence_parallel: needs parallel.tensor_model_parallel_size > 1 "
         f"(got {tp}); set sequence_parallel=false or raise the TP size")
    try:
        hf = _student_config(cfg.model.student)
    except ConfigError as e:
        hf = None
        p.append(str(e))
    if hf is not None and tp >= 1 and pp >= 1:
        text = hf.get("text_config", hf)  # multimodal checkpoints nest the LM config
        heads = text.get("num_attention_heads")
        kv_heads = text.get("num_key_value_heads", heads)
        layers = text.get("num_hidden_layers")
        for name, n in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
            need(n is None or n % tp == 0,
                 f"parallel.tensor_model_parallel_size: {tp} does not divide the student's {name} = {n} "
                 f"({cfg.model.student}/config.json)")
        need(layers is None or pp <= layers,
             f"parallel.pipeline_model_parallel_size: {pp} is more than the student's "
             f"num_hidden_layers = {layers} ({cfg.model.student}/config.json)")
    dp = None
    if world_size is not None:
        try:
            dp = par.data_parallel_size(world_size)
        except ConfigError as e:
            p.append(f"parallel: {e}")

    # rollout
    ro = cfg.rollout
    need(ro.n_samples_per_prompt >= 1, f"rollout.n_samples_per_prompt: must be >= 1, got {ro.n_samples_per_prompt}")
    need(ro.temperature >= 0, f"rollout.temperature: must be >= 0, got {ro.temperature}")
    need(0 < ro.top_p <= 1, f"rollout.top_p: must be in (0, 1], got {ro.top_p}")
    need(ro.max_prompt_len >= 1, f"rollout.max_prompt_len: must be >= 1, got {ro.max_prompt_len}")
    need(ro.max_response_len >= 1, f"rollout.max_response_len: must be >= 1, got {ro.max_response_len}")
    sg = ro.sglang
    need(0 < sg.mem_fraction_static < 1,
         f"rollout.sglang.mem_fraction_static: must be in (0, 1), got {sg.mem_fraction_static}")
    need(sg.num_engines >= 1, f"rollout.sglang.num_engines: must be >= 1, got {sg.num_engines}")
    need(sg.tp_size >= 1, f"rollout.sglang.tp_size: must be >= 1, got {sg.tp_size}")
    need(1 <= sg.base_port and sg.base_port + sg.num_engines - 1 <= 65535,
         f"rollout.sglang.base_port: ports {sg.base_port}..{sg.base_port + sg.num_engines - 1} "
         "are not all in 1..65535")

    # teachers
    names = [t.name for t in cfg.teachers]
    for i, t in enumerate(cfg.teachers):
        key = f"teachers.{i}"
        need(bool(t.name), f"{key}.name: must be a non-empty name")
        need(names.count(t.name) == 1 or not t.name, f"{key}.name: '{t.name}' is defined more than once")
        if t.engine in ("embedded", "cache"):
            need(bool(t.model_path), f"{key}.model_path: required for engine '{t.engine}'")
        if t.engine == "sglang":
            need(bool(t.servers) or bool(t.model_path),
                 f"{key}: engine 'sglang' needs servers (URLs of running servers) or model_path (to launch one)")
        for j, url in enumerate(t.servers):
            need(url.startswith(("http://", "https://")), f"{key}.servers.{j}: '{url}' is not an http(s):// URL")
        need(t.max_retries >= 0, f"{key}.max_retries: must be >= 0, got {t.max_retries}")
        need(t.timeout_s > 0, f"{key}.timeout_s: must be > 0, got {t.timeout_s}")
        need(t.max_in_flight >= 1, f"{key}.max_in_flight: must be >= 1, got {t.max_in_flight}")

    # data
    known = ", ".join(n for n in names if n) or "none defined"
    for src, sc in cfg.data.sources.items():
        need(sc.teacher in names,
             f"data.sources.{src}.teacher: '{sc.teacher}' is not defined in teachers (known: {known})")
        why = check_verifier_name(sc.verifier)
        need(why is None, f"data.sources.{src}.verifier: {why}")
    need(cfg.data.offline_samples_per_prompt >= 1,
         f"data.offline_samples_per_prompt: must be >= 1, got {cfg.data.offline_samples_per_prompt}")
    need(cfg.data.offline_max_repeat >= 1, f"data.offline_max_repeat: must be >= 1, got {cfg.data.offline_max_repeat}")

    # recipe
    rc = cfg.recipe
    need(rc.margin >= 0, f"recipe.margin: must be >= 0, got {rc.margin}")
    need(0 < rc.min_retain_ratio <= 1, f"recipe.min_retain_ratio: must be in (0, 1], got {rc.min_retain_ratio}")
    need(rc.balance_ratio > 0, f"recipe.balance_ratio: must be > 0 (correct:incorrect), got {rc.balance_ratio}")
    need(0 <= rc.eps_low < 1, f"recipe.eps_low: must be in [0, 1), got {rc.eps_low}")
    need(rc.eps_high >= 0, f"recipe.eps_high: must be >= 0, got {rc.eps_high}")
    need(rc.teacher_gap_clip > 0, f"recipe.teacher_gap_clip: must be > 0, got {rc.teacher_gap_clip}")

    # optimizer
    op = cfg.optimizer
    need(op.lr > 0, f"optimizer.lr: must be > 0, got {op.lr}")
    need(0 <= op.min_lr <= op.lr, f"optimizer.min_lr: must be in [0, optimizer.lr = {op.lr}], got {op.min_lr}")
    need(op.warmup_steps >= 0, f"optimizer.warmup_steps: must be >= 0, got {op.warmup_steps}")
    need(op.weight_decay >= 0, f"optimizer.weight_decay: must be >= 0, got {op.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        need(0 <= getattr(op, name) < 1, f"optimizer.{name}: must be in [0, 1), got {getattr(op, name)}")
    need(op.adam_eps > 0, f"optimizer.adam_eps: must be > 0, got {op.adam_eps}")
    need(op.clip_grad >= 0, f"optimizer.clip_grad: must be >= 0 (0 disables), got {op.clip_grad}")

    # trainer
    tr = cfg.trainer
    need(tr.steps >= 1, f"trainer.steps: must be >= 1, got {tr.steps}")
    need(tr.prompts_per_step >= 1, f"trainer.prompts_per_step: must be >= 1, got {tr.prompts_per_step}")
    need(tr.max_tokens_per_micro_batch >= 1,
         f"trainer.max_tokens_per_micro_batch: must be >= 1, got {tr.max_tokens_per_micro_batch}")
    per_step = tr.prompts_per_step * ro.n_samples_per_prompt
    gbs = tr.global_batch_sequences
    if gbs is not None:
        need(gbs >= 1 and per_step % gbs == 0,
             f"trainer.global_batch_sequences: {gbs} must divide the {per_step} sequences of a step "
             f"(trainer.prompts_per_step x rollout.n_samples_per_prompt)")
        if dp is not None:
            need(gbs % dp == 0,
                 f"trainer.global_batch_sequences: {gbs} is not a multiple of the data-parallel size {dp}")
    need(tr.eval_every >= 0, f"trainer.eval_every: must be >= 0, got {tr.eval_every}")
    need(tr.eval_prompts >= 0, f"trainer.eval_prompts: must be >= 0, got {tr.eval_prompts}")

    # checkpoint, logging
    need(cfg.checkpoint.save_every >= 0, f"checkpoint.save_every: must be >= 0, got {cfg.checkpoint.save_every}")
    need(cfg.checkpoint.keep_last >= 0, f"checkpoint.keep_last: must be >= 0, got {cfg.checkpoint.keep_last}")
    need(bool(cfg.logging.run_dir), "logging.run_dir: must be a non-empty path")

    if p:
        head = "invalid configuration" + (f" ({len(p)} problems)" if len(p) > 1 else "")
        raise ConfigError(head + ":\n  " + "\n  ".join(p))


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def to_yaml(cfg: JobConfig) -> str:
    """The configuration as YAML that :func:`load_config` reads back to an equal JobConfig."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: JobConfig, path: str | os.PathLike) -> None:
    """Write :func:`to_yaml` to ``path`` atomically (parent directories are created)."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".config.", suffix=".yaml.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(to_yaml(cfg))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
