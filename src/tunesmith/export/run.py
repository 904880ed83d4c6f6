"""`tunesmith export`: merge adapters into the base, write a self-contained folder, prove it, top to bottom.

config -> refusals (export_dir, adapters, legacy format, bitsandbytes) -> tokenizer + template -> probe
prompts -> base in its own dtype (never quantized) -> adapters unmerged: reference logits -> merge ->
logits check -> safetensors shards, tokenizer with chat template, generation_config with stop ids,
Modelfile -> reload with plain transformers (logits, chat template) -> optional bitsandbytes 4/8-bit ->
stop test -> README.md model card -> export_report.json -> optional hub upload.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError, Problem, TunesmithError
from tunesmith.export import merge
from tunesmith.export.card import CardData, render_card, training_summary
from tunesmith.export.checks import (
    LogitsCheck,
    default_tolerance,
    logits_check,
    probe_logits,
    reload_check,
    stop_test,
)
from tunesmith.export.probes import data_config, probes_for, read_run_manifests
from tunesmith.export.quantize import drift, quantize_folder, require_bitsandbytes
from tunesmith.export.report import REPORT_NAME, ExportReport

log = logging.getLogger("tunesmith")


def run(cfg: Any) -> ExportReport:
    """Export the configured base (+ adapters) to export_dir; raise TunesmithError when a check fails."""
    from tunesmith.model.loader import load_tokenizer
    from tunesmith.training.outputs import save_tokenizer_and_generation_config
    from tunesmith.training.setup import require_model, template_for

    t0 = time.perf_counter()
    e = cfg.export
    out = check_request(cfg)
    base = require_model(cfg)
    adapters = tuple(cfg.model.adapter_name_or_path)
    bits = e.export_quantization_bit
    if bits is not None:
        require_bitsandbytes(bits)
    if cfg.model.quantization_bit is not None:
        log.info(
            "export: quantization_bit=%s ignored: the adapters are merged into the original 16-bit base %s "
            "(merging into dequantized weights would bake the quantization error in)",
            cfg.model.quantization_bit, base,
        )  # fmt: skip

    tok_src = adapters[-1] if adapters and (Path(adapters[-1]) / "tokenizer_config.json").exists() else base
    tokenizer = load_tokenizer(tok_src, trust_remote_code=cfg.model.trust_remote_code)
    template = template_for(cfg, tokenizer)
    manifests = read_run_manifests(list(adapters) or [base])
    probes, source = ([], "")
    if e.export_check:
        probes, source = probes_for(data_config(cfg, manifests), tokenizer, template, e.export_check_prompts)

    model, dtype = merge.load_base(
        base, tokenizer, device=e.export_device, trust_remote_code=cfg.model.trust_remote_code
    )
    report = ExportReport(
        export_dir=str(out), base_model=base, dtype=str(dtype).removeprefix("torch."), device=e.export_device,
        template=template.name, quantization_bit=bits, probe_source=source,
    )  # fmt: skip
    log.info("export: %s (%s) + %d adapter(s) -> %s", base, report.dtype, len(adapters), out)

    merged_logits: list[Any] = []
    if adapters:
        peft_model = merge.attach_adapters(model, adapters)
        report.adapters = [
            {"path": p, **{k: v for k, v in a.items() if k != "name"}}
            for p, a in zip(adapters, merge.adapter_summary(peft_model))
        ]
        if e.export_check:
            reference = probe_logits(peft_model, probes)
            with peft_model.disable_adapter():
                base_logits = probe_logits(peft_model, probes)
        log.info("export: merging %d adapter(s) in %s", len(adapters), report.dtype)
        model = merge.merge_adapters(peft_model)
        del peft_model  # it holds the merged modules too; freed with `model` before the reload
        if e.export_check:
            merged_logits = probe_logits(model, probes)
            report.logits = logits_check(
                reference, merged_logits, base_logits, dtype=dtype, tolerance=e.export_check_tolerance
            )
            _fail_unless(report.logits.passed, report, _logits_failure(report.logits), clear=out)
            if not report.logits.conclusive:
                report.notes.append(
                    f"the adapter moves logits by at most {report.logits.adapter_effect:.3g}, not more than the "
                    "tolerance: the logits check could not tell a wrong merge from a right one"
                )
    else:
        report.logits = LogitsCheck(
            ran=False, skipped_reason="no adapters: nothing was merged; the model is re-exported as it is"
        )
        if e.export_check:
            merged_logits = probe_logits(model, probes)

    clear_previous_export(out)
    max_shard = f"{e.export_size}GB"
    report.weight_files = merge.save_weights(model, out, max_shard_size=max_shard)
    report.stop_ids = save_tokenizer_and_generation_config(out, tokenizer, template, model)
    report.stop_tokens = [tokenizer.decode([i]) for i in report.stop_ids]
    embed_chat_template(out)
    no_modelfile = write_modelfile(out, template, tokenizer, system=cfg.data.default_system)
    if no_modelfile:
        report.notes.append(no_modelfile)
    del model  # the reload below must not need two copies of the weights in memory

    device_map = "auto" if e.export_device == "auto" else None
    tolerance = e.export_check_tolerance
    if tolerance is None:
        scale = max((x.abs().max().item() for x in merged_logits), default=0.0)
        tolerance = default_tolerance(dtype, scale)
    if bits is not None:
        try:
            qmodel, report.weight_files = quantize_folder(
                out, bits, dtype, device=e.export_device, max_shard_size=max_shard
            )
        except TunesmithError as err:
            _record_failure(report, str(err))
            raise
        if e.export_check:
            report.quant_drift, merged_logits = drift(bits, merged_logits, qmodel, probes)
        del qmodel
    if e.export_check:
        log.info(
            "export: checks: reload with plain transformers, then the stop test on %d prompts", len(probes)
        )
        report.reload, reloaded, saved_tokenizer = reload_check(
            str(out), merged_logits, probes, template, tolerance=tolerance, device_map=device_map
        )
        r = report.reload
        _fail_unless(
            r.passed,
            report,
            f"the reloaded export differs from the model in memory (max |diff| {r.max_abs_diff:.3g}, tolerance "
            f"{r.tolerance:.3g}) or its chat template renders differently ({r.template_matches}/"
            f"{r.template_total} prompts match; {r.template_mismatch_example or 'no mismatch'})",
        )
        report.stop = stop_test(
            reloaded,
            saved_tokenizer,
            template,
            probes,
            max_new_tokens=e.export_check_max_new_tokens,
            source=source,
        )
        del reloaded

    card = CardData(
        name=out.name, base_model=base, dtype=report.dtype, template=template.name,
        stop_tokens=report.stop_tokens, adapters=report.adapters, quantization_bit=bits,
        training=[s for s in (training_summary(f) for f in (list(adapters) or [base])) if s is not None],
        checks=report.check_lines(), modelfile=not no_modelfile,
    )  # fmt: skip
    (out / "README.md").write_text(render_card(card), encoding="utf-8")
    report.ok = True
    report.seconds = time.perf_counter() - t0
    report.files = sorted({p.name for p in out.iterdir()} | {REPORT_NAME})
    report.write()
    if e.export_hub_model_id:
        push_to_hub(out, e.export_hub_model_id)
        report.hub_model_id = e.export_hub_model_id
        report.write()
    log.info("export complete: %s (%.1f s)", out, report.seconds)
    return report


def check_request(cfg: Any) -> Path:
    """Every reason to refuse before loading anything, at once; the export folder."""
    e = cfg.export
    problems = []
    if not cfg.model.model_name_or_path:
        problems.append(
            Problem("model_name_or_path", "is not set", fix="the base model: a local folder or hub id")
        )
    if not e.export_dir:
        problems.append(
            Problem("export_dir", "is not set", fix="export_dir: a new or empty folder for the merged model")
        )
    elif Path(e.export_dir).exists() and not Path(e.export_dir).is_dir():
        problems.append(
            Problem("export_dir", "is a file, not a folder", e.export_dir, fix="choose a folder path")
        )
    elif _occupied(Path(e.export_dir)):
        problems.append(Problem(
            "export_dir", f"is not empty and holds no {REPORT_NAME} (it is not an earlier tunesmith export)",
            e.export_dir, fix="choose a new or empty folder, or empty this one yourself",
        ))  # fmt: skip
    for path in cfg.model.adapter_name_or_path:
        if not (Path(path) / "adapter_config.json").is_file():
            what = "does not exist" if not Path(path).exists() else "has no adapter_config.json"
            problems.append(Problem(
                "adapter_name_or_path", f"{what}", path,
                fix="give the folder a LoRA run wrote (its output_dir or a checkpoint-N inside it)",
            ))  # fmt: skip
    if e.export_legacy_format:
        problems.append(Problem(
            "export_legacy_format", "transformers 5 saves safetensors only (save_pretrained has no .bin option)",
            True, fix="remove export_legacy_format; every current loader reads safetensors",
        ))  # fmt: skip
    if problems:
        raise ConfigError(problems, cfg.source)
    out = Path(e.export_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _occupied(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir()) and not (folder / REPORT_NAME).is_file()


def clear_previous_export(out: Path) -> None:
    """Remove the files an earlier export wrote here (its report lists them); the user's other files stay."""
    path = out / REPORT_NAME
    if not path.is_file():
        return
    try:
        names = json.loads(path.read_text(encoding="utf-8")).get("files", [])
    except json.JSONDecodeError:
        names = []
    for name in {*names, REPORT_NAME}:
        target = out / Path(name).name  # names only: a report never reaches outside its folder
        if target.is_file():
            target.unlink()
    log.info("export: replaced the earlier export in %s", out)


def embed_chat_template(out: Path) -> None:
    """Also put the chat template into tokenizer_config.json (transformers 5 writes chat_template.jinja only);
    llama.cpp's converters, older transformers and vLLM builds read it from tokenizer_config.json."""
    jinja = out / "chat_template.jinja"
    config_path = out / "tokenizer_config.json"
    if not jinja.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = jinja.read_text(encoding="utf-8")
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_modelfile(out: Path, template: Any, tokenizer: Any, *, system: str | None) -> str:
    """An Ollama Modelfile for the folder (``ollama create NAME -f Modelfile``); "" when written, else why not."""
    from tunesmith.export.ollama import NoOllamaTranslation, modelfile_text

    try:
        text = modelfile_text(template, tokenizer, system=system)
    except NoOllamaTranslation as err:  # template: auto; the export itself is still complete
        log.warning("export: no Modelfile: %s", err)
        return f"no Ollama Modelfile: {err}"
    (out / "Modelfile").write_text(text, encoding="utf-8")
    return ""


def push_to_hub(out: Path, repo_id: str) -> None:
    """Upload the export folder to a hub model repository."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(out), repo_id=repo_id, repo_type="model")
    except OSError as err:  # offline mode, no network, HTTP errors (all OSError subclasses)
        raise TunesmithError(
            f"export_hub_model_id: uploading to {repo_id!r} failed: {err}. The local export in {out} is complete "
            "and checked. Fix: log in (hf auth login), unset HF_HUB_OFFLINE, and upload the folder again "
            f"(hf upload {repo_id} {out}), or remove export_hub_model_id"
        ) from err
    log.info("export: uploaded %s to https://huggingface.co/%s", out, repo_id)


def _logits_failure(c: LogitsCheck) -> str:
    return (
        f"the merged model's logits differ from base + adapter by up to {c.max_abs_diff:.3g} (mean "
        f"{c.mean_abs_diff:.3g}), more than the tolerance {c.tolerance:.3g} ({c.tolerance_source}); the adapter "
        f"itself moves them by up to {c.adapter_effect:.3g}. Nothing was written but {REPORT_NAME}. Likely causes: "
        "an adapter trained on another base, a PEFT version that merges differently, or merging in a lower "
        "precision than the base's. If the difference is rounding only, raise export_check_tolerance"
    )


def _fail_unless(ok: bool, report: ExportReport, message: str, *, clear: Path | None = None) -> None:
    """Record a failed check in export_report.json and raise."""
    if ok:
        return
    if clear is not None:
        clear_previous_export(clear)
    _record_failure(report, message)
    raise TunesmithError(f"export check failed: {message}. Report: {Path(report.export_dir) / REPORT_NAME}")


def _record_failure(report: ExportReport, message: str) -> None:
    """export_report.json with ok false, the error, and the files there now (a re-export removes them)."""
    report.error = message
    report.files = sorted({p.name for p in Path(report.export_dir).iterdir()} | {REPORT_NAME})
    report.write()
