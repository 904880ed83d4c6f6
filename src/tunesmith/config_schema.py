"""The typed config groups: every key tunesmith accepts besides HF TrainingArguments fields.

Keys are flat and named as in LLaMA-Factory so a user's YAML runs unchanged. Each field's
``metadata["help"]`` is its one-line doc (used for ``--help``); ``ge``/``gt``/``le``/``lt`` metadata
are bounds checked at load time. Loading and validation live in ``tunesmith.config``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Stage = Literal["pt", "sft", "rm", "dpo", "kto", "ppo", "grpo"]


def opt(default: Any, doc: str, **bounds: float) -> Any:
    """A config field with its one-line doc and optional numeric bounds (ge, gt, le, lt)."""
    return field(default=default, metadata={"help": doc, **bounds})


@dataclass(frozen=True)
class ModelArgs:
    model_name_or_path: str | None = opt(None, "Hub id or local path of the base model.")
    adapter_name_or_path: tuple[str, ...] = opt((), "Adapter path(s) to load on the model (comma list).")
    template: str | None = opt(None, "Chat template name; 'auto' uses the tokenizer's own template.")
    trust_remote_code: bool = opt(False, "Allow custom modelling code from the model repository.")
    cache_dir: str | None = opt(None, "Where downloaded models are cached (default: the HF cache).")
    model_revision: str = opt("main", "Model revision: branch, tag or commit id.")
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2", "flex", "varlen"] = opt(
        "auto",
        "Attention implementation (auto: flash-attn if installed, else varlen for pt/sft training on a GPU, "
        "else sdpa; flex: PyTorch flex attention, skips cross-document blocks of packed rows; "
        "varlen: PyTorch's flash varlen kernel, one document at a time, no mask).",
    )
    varlen_kernel: Literal["auto", "torch", "fa4"] = opt(
        "auto",
        "The kernel varlen attention runs on a GPU. auto: FlashAttention-4 where the flash-attn-4 package is "
        "installed (pip install 'tunesmith[fa4]') and has kernels for the GPU (Hopper, Blackwell), and agrees with "
        "PyTorch's kernel on a check at start; else PyTorch's flash kernel. torch: PyTorch's; fa4: FA4 or an error.",
    )
    quantization_bit: int | None = opt(None, "Load the model quantized to 4 or 8 bits (QLoRA).")
    quantization_method: Literal["bnb"] = opt("bnb", "Quantization backend for quantization_bit.")
    quantization_type: Literal["nf4", "fp4"] = opt("nf4", "4-bit data type (bitsandbytes).")
    double_quantization: bool = opt(True, "Also quantize the quantization constants (4-bit).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = opt(
        "auto",
        "Training dtype when neither bf16 nor fp16 is set: auto = bf16 on capable GPUs, fp16, fp32 on CPU.",
    )
    new_special_tokens: tuple[str, ...] = opt((), "Special tokens to add; embeddings grow and are trained.")
    resize_vocab: bool = opt(
        False, "Train (and save) the embeddings and output head, e.g. after adding tokens."
    )
    tiled_mlp_tokens: int | None = opt(
        None,
        "Run each decoder layer's MLP over this many tokens at a time, forward and backward (e.g. 4096): "
        "less activation memory for long sequences, one more MLP forward per step (dense gated MLPs).",
        ge=1,
    )
    fused_layers: bool | None = opt(
        None,
        "Swap the model's RMSNorm layers for torch's fused rms_norm, and its gated SiLU MLPs' silu(gate) * up "
        "and its attention's rotary embedding (Llama, Mistral, Qwen2, Qwen3) for one Triton kernel each way (the same numbers "
        "up to rounding, parameter names unchanged), for the layer classes a probe at start shows compute "
        "exactly that (logged). Unset: on for training on a GPU; true: also on CPU (where the MLP and RoPE keep "
        "the eager math); false: off. Off with torch_compile, whose inductor fuses these layers itself.",
    )
    offload_activations: bool = opt(
        False,
        "Keep each checkpointed decoder layer's input in pinned CPU memory from forward to backward (copied "
        "on a side stream, prefetched back): less GPU memory for long sequences, more PCIe traffic. Turns "
        "gradient checkpointing on (disable_gradient_checkpointing: false).",
    )
    disable_gradient_checkpointing: bool | None = opt(
        None,
        "true: gradient checkpointing off; false: on. Unset: pt/sft on a GPU (one process or DDP, not QLoRA) "
        "turn it off when the run fits in half the GPU's memory without it (measured at start, logged); "
        "otherwise on with a GPU, off on CPU.",
    )


@dataclass(frozen=True)
class DataArgs:
    dataset: tuple[str, ...] = opt((), "Training dataset names from dataset_info.json, or file paths.")
    dataset_dir: str = opt("data", "Folder holding dataset_info.json and the data files.")
    eval_dataset: tuple[str, ...] = opt((), "Evaluation dataset names or paths (exclusive with val_size).")
    cutoff_len: int = opt(2048, "Maximum tokens per sample after tokenization.", ge=1)
    max_samples: int | None = opt(None, "Use at most this many samples of each dataset.", ge=1)
    val_size: float = opt(0.0, "Held-out share (<1) or count (>=1) of the training data.", ge=0)
    preprocessing_num_workers: int | None = opt(None, "Worker processes for preprocessing.", ge=1)
    preprocessing_batch_size: int = opt(1000, "Rows per preprocessing batch.", ge=1)
    overwrite_cache: bool = opt(False, "Rebuild cached preprocessed data instead of reusing it.")
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = opt(
        "concat", "How several datasets are mixed."
    )
    interleave_probs: tuple[float, ...] = opt((), "Sampling probability per dataset when interleaving.")
    packing: bool | None = opt(None, "Pack samples into cutoff_len sequences (default: on for pt).")
    neat_packing: bool = opt(False, "Pack without cross-attention between packed samples.")
    train_on_prompt: bool = opt(False, "Also compute the loss on prompt tokens.")
    mask_history: bool = opt(False, "Train only on the last assistant turn of each conversation.")
    default_system: str | None = opt(None, "System prompt for samples that have none.")
    enable_thinking: bool | None = opt(None, "Reasoning models: thinking on/off (None: template default).")
    bad_rows: Literal["skip", "fail"] = opt("skip", "Invalid rows: skip them with a summary, or fail.")
    max_bad_row_share: float = opt(0.5, "Fail when more than this share of rows is invalid.", ge=0, le=1)
    truncation: Literal["keep_response", "drop"] = opt(
        "keep_response", "Over-long samples: cut the prompt to keep the response, or drop the sample."
    )
    data_cache_dir: str | None = opt(
        None, "Cache of converted data (default: $TUNESMITH_CACHE or ~/.cache/tunesmith)."
    )


@dataclass(frozen=True)
class FinetuningArgs:
    stage: Stage = opt("sft", "Training stage.")
    finetuning_type: Literal["full", "freeze", "lora"] = opt("lora", "Which parameters are trained.")
    lora_rank: int = opt(8, "LoRA rank.", ge=1)
    lora_alpha: int | None = opt(None, "LoRA scale numerator (default: 2 * lora_rank).", ge=1)
    lora_dropout: float = opt(0.0, "Dropout on the LoRA input.", ge=0, lt=1)
    lora_target: tuple[str, ...] = opt(("all",), "Module names that get LoRA adapters; 'all' = every linear.")
    additional_target: tuple[str, ...] = opt((), "Extra modules trained in full besides LoRA (e.g. lm_head).")
    pure_bf16: bool = opt(
        False,
        "Keep trained weights in bf16 (no fp32 copy): less memory. AdamW then rounds updates stochastically "
        "(stochastic_rounding), so small updates are kept on average.",
    )
    stochastic_rounding: bool = opt(
        True,
        "With pure_bf16 and optim adamw_torch(_fused): AdamW writes bf16 weights and moments back with "
        "stochastic rounding; false rounds to nearest (LLaMA-Factory's pure_bf16: updates below bf16's "
        "resolution are lost).",
    )
    use_dora: bool = opt(False, "Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = opt(False, "Rank-stabilised LoRA scaling.")
    pissa_init: bool = opt(False, "Initialise LoRA from principal singular vectors (PiSSA).")
    pissa_iter: int = opt(16, "Fast-SVD iterations for PiSSA; -1 for exact SVD.", ge=-1)
    loraplus_lr_ratio: float | None = opt(None, "LoRA+ learning-rate ratio of B to A.", gt=0)
    freeze_trainable_layers: int = opt(2, "Freeze tuning: train the last n layers (first n if negative).")
    freeze_trainable_modules: tuple[str, ...] = opt(("all",), "Freeze tuning: module names trained in them.")
    freeze_extra_modules: tuple[str, ...] = opt((), "Freeze tuning: modules trained besides the layers.")
    pref_beta: float = opt(0.1, "Beta of the preference loss.", ge=0)
    pref_ftx: float = opt(0.0, "Weight of the SFT loss added to the preference loss.", ge=0)
    pref_loss: Literal["sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo"] = opt(
        "sigmoid", "DPO loss variant."
    )
    dpo_label_smoothing: float = opt(0.0, "Robust DPO label smoothing.", ge=0, le=0.5)
    simpo_gamma: float = opt(0.5, "Target reward margin of SimPO.")
    kto_chosen_weight: float = opt(1.0, "KTO weight of desirable samples.", gt=0)
    kto_rejected_weight: float = opt(1.0, "KTO weight of undesirable samples.", gt=0)
    ref_model: str | None = opt(None, "Reference model for DPO/KTO (default: the initial policy).")
    ref_model_adapters: tuple[str, ...] = opt((), "Adapters of the reference model.")
    pref_precompute_ref: bool = opt(
        False,
        "DPO/KTO: compute the reference log-probs once before training (cached with the data) and free "
        "the reference model; no reference forward passes while training.",
    )
    reward_model: str | None = opt(None, "Reward model path (PPO).")
    create_new_adapter: bool = opt(False, "Merge the given adapters and train a fresh one on top.")
    early_stopping_steps: int | None = opt(
        None, "Stop when eval loss has not improved for this many evals.", ge=1
    )
    reward_model_adapters: tuple[str, ...] = opt((), "Adapters of the reward model.")
    # grpo / ppo (the rollouts' sampling settings are the generation keys: temperature, max_new_tokens, ...)
    reward_funcs: tuple[str, ...] = opt(
        (),
        "GRPO (and PPO without reward_model): reward functions, built-in exact_match, format, length, "
        "or module:function (comma list).",
    )
    reward_weights: tuple[float, ...] = opt((), "Weight of each reward function (default: all 1).")
    answer_column: str = opt("answer", "exact_match: data column of the reference answer (else the label).")
    reward_format_pattern: str = opt(
        r"<think>.*?</think>\s*<answer>.*?</answer>", "format: regex the whole completion must match."
    )
    reward_length_target: int = opt(
        512, "length: completions longer than this many tokens lose reward.", ge=1
    )
    num_generations: int = opt(8, "GRPO: completions sampled per prompt (the group).", ge=2)
    grpo_beta: float = opt(0.04, "GRPO: KL coefficient to the reference (0: no reference pass).", ge=0)
    grpo_epsilon: float = opt(0.2, "GRPO: clip range of the probability ratio.", gt=0)
    grpo_iterations: int = opt(1, "GRPO: optimisation steps per generation batch.", ge=1)
    ppo_epochs: int = opt(4, "PPO: optimisation steps per rollout batch.", ge=1)
    ppo_score_norm: bool = opt(False, "PPO: normalise scores by their running mean and std.")
    ppo_whiten_rewards: bool = opt(False, "PPO: whiten the per-token rewards of each batch.")
    ppo_kl_coef: float = opt(0.2, "PPO: KL penalty coefficient (the start value when adaptive).", ge=0)
    ppo_target: float | None = opt(
        6.0, "PPO: target KL per completion of the adaptive KL coefficient; null: fixed ppo_kl_coef.", gt=0
    )


# TrainingArguments fields that are also typed fields here, because tunesmith itself reads them.
PROMOTED_HF_FIELDS = ("output_dir", "do_train", "do_eval", "do_predict", "seed", "resume_from_checkpoint")


@dataclass(frozen=True)
class TrainingArgs:
    output_dir: str | None = opt(None, "Where checkpoints, logs and the resolved config are written.")
    do_train: bool = opt(False, "Train.")
    do_eval: bool = opt(False, "Evaluate on the eval data.")
    do_predict: bool = opt(False, "Generate predictions for the eval data.")
    seed: int = opt(42, "Random seed for training, sampling and data shuffling.")
    resume_from_checkpoint: str | None = opt(None, "Checkpoint folder to resume training from.")
    overwrite_output_dir: bool = opt(False, "Allow writing into a non-empty output_dir.")
    plot_loss: bool = opt(False, "Save loss curves as PNG after training.")
    cuda_graphs: bool | None = opt(
        None,
        "Replay each batch shape's forward + backward as a CUDA graph (widths on a grid, under 1/4 padding): "
        "much faster small steps. Unset: on where the step allows (LoRA or freeze on one GPU, unpacked batches, "
        "varlen attention, fused loss, no gradient checkpointing, no quantization, no fp16), logged; true: "
        "required (full fine-tuning too); false: off.",
    )
    deferred_logging: bool = opt(
        True,
        "On a GPU, read each log event's loss, grad norm and token count a step later, so logging (even every "
        "step) never stalls the GPU; records keep their step and the time their step ended. false: read at "
        "the logged step, as transformers does.",
    )
    # Launch settings (tunesmith train relaunches itself under torchrun); unset means the environment
    # variable of the same name in capitals, then the default.
    nnodes: int | None = opt(None, "Nodes of a multi-node run ($NNODES; default 1).", ge=1)
    node_rank: int | None = opt(None, "This node's index, 0 to nnodes-1 ($NODE_RANK; default 0).", ge=0)
    master_addr: str | None = opt(None, "Address of node 0, reachable from every node ($MASTER_ADDR).")
    master_port: int | None = opt(
        None, "Rendezvous port on node 0 ($MASTER_PORT; default: a free port).", ge=1, le=65535
    )
    hf: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Other transformers.TrainingArguments keys set by the user, validated."},
    )

    def hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers.TrainingArguments (a fresh dict)."""
        return dict(
            self.hf,
            output_dir=self.output_dir,
            do_train=self.do_train,
            do_eval=self.do_eval,
            do_predict=self.do_predict,
            seed=self.seed,
            resume_from_checkpoint=self.resume_from_checkpoint,
        )


@dataclass(frozen=True)
class GenerationArgs:
    do_sample: bool = opt(True, "Sample; false = greedy or beam search.")
    temperature: float = opt(0.95, "Sampling temperature.", gt=0)
    top_p: float = opt(0.7, "Nucleus sampling: keep the smallest token set with this mass.", gt=0, le=1)
    top_k: int = opt(50, "Keep only the k most likely tokens (0: no limit).", ge=0)
    num_beams: int = opt(1, "Beams for beam search (1: none).", ge=1)
    max_length: int | None = opt(None, "Limit on prompt plus new tokens (max_new_tokens wins).", ge=1)
    max_new_tokens: int = opt(1024, "Most tokens generated per answer.", ge=1)
    repetition_penalty: float = opt(1.0, "Penalty on repeated tokens (1.0: none).", gt=0)
    length_penalty: float = opt(1.0, "Beam search length penalty exponent.")
    skip_special_tokens: bool = opt(True, "Drop special tokens from decoded text.")
    stop: tuple[str, ...] = opt(
        (), "Extra stop strings (comma list); the template's stop tokens always apply."
    )


@dataclass(frozen=True)
class InferArgs:
    infer_backend: Literal["huggingface", "vllm"] = opt("huggingface", "Inference engine.")
    infer_dtype: Literal["auto", "float16", "bfloat16", "float32"] = opt("auto", "Inference dtype.")
    vllm_maxlen: int = opt(4096, "vLLM: maximum prompt plus answer length.", ge=1)
    vllm_gpu_util: float = opt(0.7, "vLLM: share of GPU memory to use.", gt=0, le=1)
    vllm_enforce_eager: bool = opt(False, "vLLM: disable CUDA graphs.")
    vllm_max_lora_rank: int = opt(32, "vLLM: largest LoRA rank served.", ge=1)
    api_host: str = opt("127.0.0.1", "API server address; 0.0.0.0 listens on all interfaces ($API_HOST).")
    api_port: int = opt(8000, "API server port ($API_PORT).", ge=1, le=65535)
    api_key: str | None = opt(None, "Bearer token the API server requires ($API_KEY).")


@dataclass(frozen=True)
class ExportArgs:
    export_dir: str | None = opt(None, "Folder the merged model is exported to.")
    export_size: int = opt(5, "Maximum shard size of the exported model, in GB.", ge=1)
    export_device: Literal["cpu", "auto"] = opt("cpu", "Device used to merge adapters.")
    export_legacy_format: bool = opt(False, "Save .bin files instead of safetensors.")
    export_hub_model_id: str | None = opt(None, "Hub repository to push the exported model to.")
    export_quantization_bit: int | None = opt(
        None, "Quantize the exported model to 4 or 8 bits with bitsandbytes (loads on a GPU)."
    )
    export_check: bool = opt(True, "Prove the export: logits vs base + adapter, plain reload, stop test.")
    export_check_tolerance: float | None = opt(
        None, "Largest allowed max-abs logit difference of the merge (default: by dtype).", gt=0
    )
    export_check_prompts: int = opt(8, "Held-out prompts of the stop test.", ge=1)
    export_check_max_new_tokens: int = opt(128, "Token budget of each stop-test answer.", ge=1)


@dataclass(frozen=True)
class EvalArgs:
    task: str | None = opt(
        None,
        "BENCHMARK_SPLIT (mmlu_test, cmmlu_test, ceval_validation, sample_test) or perplexity "
        "(of eval_dataset, else dataset; stage pt or sft).",
    )
    task_dir: str = opt(
        "evaluation", "Folder holding the benchmark folders (<task_dir>/<benchmark>/<split>/*.csv)."
    )
    batch_size: int = opt(4, "Evaluation batch size.", ge=1)
    n_shot: int = opt(5, "Few-shot examples per question, from the dev split.", ge=0)
    lang: Literal["en", "zh"] = opt("en", "Language of the benchmark prompts.")
    save_dir: str | None = opt(
        None, "Folder for results.json and predictions.jsonl (unset: results are only printed)."
    )


@dataclass(frozen=True)
class Config:
    """A validated tunesmith config: typed groups, never mutated after loading."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    finetuning: FinetuningArgs = field(default_factory=FinetuningArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)
    generation: GenerationArgs = field(default_factory=GenerationArgs)
    infer: InferArgs = field(default_factory=InferArgs)
    export: ExportArgs = field(default_factory=ExportArgs)
    evaluation: EvalArgs = field(default_factory=EvalArgs)
    source: str = field(default="", compare=False)  # the file it came from ("" for overrides only)
    warnings: tuple[str, ...] = field(default=(), compare=False)  # harmless oddities for the CLI to print

    def to_flat_dict(self) -> dict[str, Any]:
        """The flat resolved mapping (the keys a user writes); tuples become lists."""
        flat: dict[str, Any] = {}
        groups = (
            self.model,
            self.data,
            self.finetuning,
            self.training,
            self.generation,
            self.infer,
            self.export,
            self.evaluation,
        )
        for group in groups:
            for name, value in asdict(group).items():
                if name != "hf":
                    flat[name] = list(value) if isinstance(value, tuple) else value
        flat.update(asdict(self.training)["hf"])
        return flat


# Group attribute of Config -> group class, in the order keys are written.
GROUPS: dict[str, type] = {
    "model": ModelArgs,
    "data": DataArgs,
    "finetuning": FinetuningArgs,
    "training": TrainingArgs,
    "generation": GenerationArgs,
    "infer": InferArgs,
    "export": ExportArgs,
    "evaluation": EvalArgs,
}


# LLaMA-Factory keys a user may carry over that tunesmith does not implement (yet). They fail with
# "not supported by tunesmith yet" instead of "unknown key", so the user knows the key is real.
_UNSUPPORTED_WORDS = """
tokenized_path streaming buffer_size tool_format
adapter_folder use_fast_tokenizer  split_special_tokens add_tokens add_special_tokens
 low_cpu_mem_usage rope_scaling shift_attn mixture_of_depths use_unsloth use_unsloth_gc
enable_liger_kernel moe_aux_loss_coef  use_reentrant_gc upcast_layernorm
upcast_lmhead_output train_from_scratch offload_folder hf_hub_token ms_hub_token om_hub_token
print_param_status compute_dtype device_map model_max_length block_diag_attn quantization_device_map
use_kv_cache image_max_pixels image_min_pixels image_do_pan_and_scan crop_to_patches video_max_pixels
video_min_pixels video_fps video_maxlen use_audio_in_video audio_sampling_rate media_dir image_dir
export_quantization_dataset export_quantization_nsamples export_quantization_maxlen
vllm_config sglang_maxlen sglang_mem_fraction sglang_tp_size sglang_config
sglang_lora_backend eval_num_beams ignore_pad_token_for_loss eval_on_each_dataset
data_shared_file_system use_llama_pro use_adam_mini use_muon freeze_vision_tower
freeze_multi_modal_projector freeze_language_model compute_accuracy disable_shuffling
 include_effective_tokens_per_second loraplus_lr_embedding pissa_convert
 ppo_buffer_size
ref_model_quantization_bit reward_model_quantization_bit reward_model_type ld_alpha use_galore
galore_target galore_rank galore_update_interval galore_scale galore_proj_type galore_layerwise
use_apollo apollo_target apollo_rank apollo_update_interval apollo_scale apollo_proj apollo_proj_type
apollo_scale_type apollo_layerwise apollo_scale_front use_badam badam_mode badam_start_block
badam_switch_mode badam_switch_interval badam_update_ratio badam_mask_mode badam_verbose use_swanlab
swanlab_project swanlab_workspace swanlab_run_name swanlab_mode swanlab_api_key swanlab_logdir
swanlab_lark_webhook_url swanlab_lark_secret ray_run_name ray_storage_path ray_num_workers
resources_per_worker placement_strategy ray_init_kwargs download_mode predict_with_generate
generation_max_length generation_num_beams generation_config sortish_sample
"""
LLAMAFACTORY_UNSUPPORTED = frozenset(_UNSUPPORTED_WORDS.split())

# TrainingArguments keys of older transformers releases -> how to write them now. Used only while the
# installed TrainingArguments lacks the key, so an older or newer release that has it just works.
REMOVED_HF_KEYS: dict[str, str] = {
    "evaluation_strategy": "renamed: write eval_strategy instead",
    "no_cuda": "renamed: write use_cpu instead",
    "group_by_length": "removed from transformers: write train_sampling_strategy: group_by_length",
    "push_to_hub_model_id": "renamed: write hub_model_id instead",
    "logging_dir": "removed from transformers: logs go under output_dir "
    "(or set the environment variable TENSORBOARD_LOGGING_DIR)",
    "save_safetensors": "removed from transformers, which always saves safetensors: delete the key",
}

# Old TrainingArguments key -> its replacement, translated when the installed release lacks the old key.
# transformers 5 folded warmup_ratio into warmup_steps (a value below 1 is a ratio of the total steps).
HF_TRANSLATED_KEYS: dict[str, str] = {"warmup_ratio": "warmup_steps"}

# Keys never written to tunesmith_config.yaml, so a resolved config can be shared safely.
SECRET_KEYS = ("api_key", "hub_token")
