"""GPU checks: ROME/MEMIT seconds per edit and statistics throughput on randomly initialised
GPT-2 XL-shaped (1.56B) and Llama-2-7B-shaped (6.9B) models, in float32 and bfloat16, each
beside a plain truncated forward over the same tokens; then the CLI with --device/--dtype and
--device-map on a small saved model. Run through bench/gpu_check.sh.

    bench/gpu_check.sh                 # on one H100 (about 6 minutes)
    bench/gpu_check.sh --smoke         # tiny shapes on CPU, seconds (the test suite runs it)

Random weights say nothing about edit quality; they give the shapes' costs. Timings exclude
statistics and context templates (cached by a warm-up edit) and include everything else of
an edit at the research code's settings (21 prompts, 20 optimisation steps, no early stop).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# name: (config class, real-shape kwargs, ROME's layer in the research code / EasyEdit)
SHAPES = {
    "gpt2-xl": ("GPT2Config", dict(n_layer=48, n_embd=1600, n_head=25, n_positions=1024), 17),
    "llama-7b": ("LlamaConfig", dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                                     num_key_value_heads=32, intermediate_size=11008,
                                     max_position_embeddings=4096), 5),
}  # fmt: skip
SMOKE = {
    "gpt2-xl": ("GPT2Config", dict(n_layer=4, n_embd=64, n_head=4, n_positions=128), 1),
    "llama-7b": ("LlamaConfig", dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                                     num_key_value_heads=4, intermediate_size=160,
                                     max_position_embeddings=128), 1),
}  # fmt: skip
REQUESTS = [
    {
        "prompt": "{} is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": {"str": "Rome"},
    },
    {
        "prompt": "{} was the founder of",
        "subject": "Steve Jobs",
        "target_new": {"str": "Microsoft"},
    },
    {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English"},
    },
    {
        "prompt": "{} plays the position of",
        "subject": "Lionel Messi",
        "target_new": {"str": "goalkeeper"},
    },
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    if path and Path(path).is_dir():
        tok = AutoTokenizer.from_pretrained(path)
    else:  # the default model's tokenizer (vocabulary 49152), through factedit's loader
        from factedit.models import _dequantised_dir, smollm2_gguf_path

        tok = AutoTokenizer.from_pretrained(_dequantised_dir(smollm2_gguf_path()))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def build_model(shape: str, dtype: torch.dtype, device: torch.device, smoke: bool, vocab: int):
    import transformers as T

    cls, kw, layer = (SMOKE if smoke else SHAPES)[shape]
    config = getattr(T, cls)(vocab_size=vocab, bos_token_id=0, eos_token_id=0, **kw)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 7B model in seconds, not minutes
        model = T.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model, layer


def random_corpus(tok, n_docs: int, words: int, seed: int = 0):
    """Documents of random vocabulary tokens (no corpus package needed on the GPU machine)."""
    from factedit.corpus import Corpus

    g = torch.Generator().manual_seed(seed)
    docs = [
        tok.decode(torch.randint(100, len(tok), (words,), generator=g).tolist())
        for _ in range(n_docs)
    ]
    return Corpus.from_texts(docs, name=f"random-{seed}")


@torch.no_grad()
def plain_truncated_forward(
    model, rows: torch.Tensor, name: str, device: torch.device, batch_rows: int
) -> None:
    from factedit.hooks import Trace

    for s in range(0, rows.shape[0], batch_rows):
        b = rows[s : s + batch_rows]
        with Trace(model, name, retain_output=False, stop=True):
            model(
                input_ids=b.clamp(min=0).to(device),
                attention_mask=(b >= 0).long().to(device),
                use_cache=False,
            )


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def check_stats(model, tok, arch, layer: int, device, tokens: int, batch_rows: int) -> dict:
    from factedit.models import max_positions
    from factedit.stats import compute_second_moment, packed_token_rows

    corpus = random_corpus(tok, n_docs=max(8, tokens // 200), words=256)
    t0 = time.perf_counter()
    rows = packed_token_rows(tok, corpus, tokens, min(256, max_positions(model) or 256))
    tokenise = time.perf_counter() - t0
    n = int((rows >= 0).sum())
    name = arch.mlp_out_name(layer)
    kw = dict(arch=arch, rows=rows, batch_rows=batch_rows, progress=False)
    compute_second_moment(model, tok, layer, **{**kw, "rows": rows[:batch_rows]})  # warm-up
    plain_truncated_forward(model, rows[:batch_rows], name, device, batch_rows)
    s_t, p_t = [], []
    for _ in range(2):  # alternate, so both see the same conditions
        s_t.append(timed(lambda: compute_second_moment(model, tok, layer, **kw), device))
        p_t.append(
            timed(lambda: plain_truncated_forward(model, rows, name, device, batch_rows), device)
        )
    s, p = min(s_t), min(p_t)
    return {
        "tokens": n,
        "stats_tok_s": n / s,
        "plain_tok_s": n / p,
        "ratio": p / s,
        "tokenise_s": tokenise,
    }


def fwd_bwd_unit(model, tok, request, templates, device) -> float:
    """Seconds of one forward+backward of the whole model over the edit's prompts."""
    from factedit.requests import as_requests
    from factedit.tokens import prompt_target_batch

    req = as_requests(request)[0]
    texts = [t.replace("{}", req.text) for t in templates]
    b = prompt_target_batch(
        tok, [*texts, f"{req.subject} is a"], [req.target_text] * len(texts) + [" a"]
    )
    ids, mask = b.input_ids.to(device), b.attention_mask.to(device)

    def once():
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        out.logits.float().logsumexp(-1).mean().backward()

    once()
    t = min(timed(once, device) for _ in range(3))
    model.zero_grad(set_to_none=True)
    return t


def check_edits(
    model, tok, method: str, layer: int, device, n_edits: int, hp: dict, cache: Path
) -> dict:
    from factedit.methods import EditContext, edit
    from factedit.methods.rome import context_templates

    ctx = EditContext(
        cache_dir=cache, progress=False, stats_corpus=random_corpus(tok, 64, 256, seed=1)
    )
    warm = edit(model, tok, REQUESTS[0], method=method, hparams=hp, context=ctx)  # fills the caches
    warm.restore()
    times, phases = [], []
    for req in (REQUESTS * 4)[1 : 1 + n_edits]:
        sync(device)
        t0 = time.perf_counter()
        r = edit(model, tok, req, method=method, hparams=hp, context=ctx)
        sync(device)
        times.append(time.perf_counter() - t0)
        phases.append(r.timings)
        r.restore()
    out = {
        "s_per_edit": statistics.median(times),
        "phases": {k: statistics.median(p.get(k, 0.0) for p in phases) for k in phases[0]},
    }
    if method == "rome":
        from factedit.methods import resolve_hparams
        from factedit.methods.rome import ROME

        rhp = resolve_hparams(ROME(), model, hp, None)
        out["fwd_bwd_s"] = fwd_bwd_unit(
            model, tok, REQUESTS[1], context_templates(model, tok, rhp, ctx), device
        )
    return out


def cli_checks(device: str, dtype: str, tok, smoke: bool, work: Path) -> list[str]:
    """Every command with --device/--dtype, and --device-map auto, on a small saved model."""
    import transformers as T

    folder = work / "small-llama"
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(
        T.LlamaConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=160, vocab_size=len(tok), max_position_embeddings=256)
    ).save_pretrained(folder)  # fmt: skip
    tok.save_pretrained(folder)
    data = work / "cases.json"
    data.write_text(json.dumps([
        {"case_id": i, "requested_rewrite": {"prompt": r["prompt"], "subject": r["subject"], "relation_id": "P0",
         "target_new": {"str": r["target_new"]["str"], "id": "Q1"}, "target_true": {"str": "Paris", "id": "Q2"}},
         "paraphrase_prompts": [r["prompt"].format(r["subject"])], "neighborhood_prompts": ["The Louvre is located in the city of"],
         "attribute_prompts": [], "generation_prompts": [r["prompt"].format(r["subject"])]} for i, r in enumerate(REQUESTS[:2])
    ]))  # fmt: skip
    hp = json.dumps(
        {"layer": 1, "v_num_grad_steps": 3, "context_templates": [[3, 2]], "mom2_tokens": 2000}
    )
    corpus = work / "corpus.json"
    corpus.write_text(json.dumps([d for d in random_corpus(tok, 16, 200, seed=2)]))
    dev = ["--model", str(folder), "--device", device, "--dtype", dtype]
    commands = [
        ["info", *dev],
        ["generate", "The Eiffel Tower is in", "--max-new-tokens", "5", *dev],
        ["stats", "--layer", "1", "--tokens", "2000", "--corpus", str(corpus), *dev],
        ["edit", "--prompt", "{} is located in the city of", "--subject", "The Eiffel Tower", "--target", "Rome",
         "--hparams", hp, "--corpus", str(corpus), "--save", str(work / "e.safetensors"), "--max-new-tokens", "3", *dev],
        ["apply", str(work / "e.safetensors"), "--out", str(work / "applied"), *dev],
        ["trace", "The Eiffel Tower is in the city of", "--subject", "The Eiffel Tower", "--samples", "2",
         "--out", str(work / "trace"), *dev],
        ["eval", "--method", "rome", "--data", "counterfact", str(data), "--hparams", hp, "--no-generation",
         "--no-progress", "--corpus", str(corpus), "--out", str(work / "eval.jsonl"), *dev],
        ["edit", "--prompt", "{} is located in the city of", "--subject", "The Eiffel Tower", "--target", "Rome",
         "--hparams", hp, "--corpus", str(corpus), "--max-new-tokens", "3", "--model", str(folder), "--device-map", "auto",
         "--dtype", dtype],
    ]  # fmt: skip
    lines = []
    env = dict(os.environ, FACTEDIT_CACHE=str(work / "cache"))
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    for cmd in commands:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "factedit", *cmd],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        ok = (
            "ok"
            if proc.returncode == 0
            else f"FAILED ({proc.returncode}): {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
        )
        lines.append(
            f"  factedit {cmd[0]:8s} {' '.join(a for a in cmd[1:] if a.startswith('--device') or a in ('auto', device))}: {ok} ({time.perf_counter() - t0:.1f} s)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU, a few tokens (for the test suite)"
    )
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--shapes", default="gpt2-xl,llama-7b")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--methods", default="rome,memit")
    ap.add_argument(
        "--edits", type=int, default=3, help="timed edits per setting (after one warm-up)"
    )
    ap.add_argument("--stats-tokens", type=int, default=65536)
    ap.add_argument(
        "--batch-rows", type=int, default=32, help="rows of 256 tokens per statistics batch"
    )
    ap.add_argument("--tokenizer", default=str(REPO / ".gpu_check" / "tokenizer"))
    ap.add_argument(
        "--save-tokenizer",
        default=None,
        metavar="DIR",
        help="save the tokenizer for the GPU machine and exit",
    )
    ap.add_argument("--no-cli", action="store_true", help="skip the command-line checks")
    ap.add_argument("--cli-dtypes", default="bfloat16", help="dtypes of the command-line checks")
    args = ap.parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    if args.save_tokenizer:
        tok.save_pretrained(args.save_tokenizer)
        print(f"tokenizer saved to {args.save_tokenizer}")
        return 0
    from factedit.arch import describe
    from factedit.methods import available_methods
    from factedit.models import parse_dtype

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke:
        args.edits, args.stats_tokens, args.batch_rows = 1, 512, 2
    torch.set_num_threads(1 if args.smoke else torch.get_num_threads())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("command: bench/gpu_check.sh " + " ".join(sys.argv[1:]))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in [m for m in methods if m not in available_methods()]:
        print(
            f"note: method {m!r} is not available in this factedit ({available_methods()}); skipped"
        )
    methods = [m for m in methods if m in available_methods()]
    steps = 2 if args.smoke else 20
    templates = [[3, 2]] if args.smoke else [[5, 10], [10, 10]]
    results = []
    with tempfile.TemporaryDirectory() as work_s:
        work = Path(work_s)
        for shape in args.shapes.split(","):
            for dtype_name in args.dtypes.split(","):
                dtype = parse_dtype(dtype_name)
                t0 = time.perf_counter()
                model, layer = build_model(shape, dtype, device, args.smoke, len(tok))
                arch = describe(model)
                n_params = sum(p.numel() for p in model.parameters())
                print(
                    f"\n{shape} ({n_params / 1e9:.2f}B parameters), {dtype_name}, layer {layer}; built in {time.perf_counter() - t0:.1f} s"
                )
                st = check_stats(
                    model, tok, arch, layer, device, args.stats_tokens, args.batch_rows
                )
                print(f"  statistics: {st['stats_tok_s']:,.0f} tokens/s vs plain truncated forward {st['plain_tok_s']:,.0f} tokens/s "
                      f"= {st['ratio']:.2f}x ({st['tokens']} tokens; tokenising them took {st['tokenise_s']:.2f} s more)")  # fmt: skip
                row = {"shape": shape, "dtype": dtype_name, "params": n_params, "stats": st}
                for method in methods:
                    hp = {"mom2_tokens": args.stats_tokens}
                    if method == "rome":
                        hp.update(
                            layer=layer,
                            v_num_grad_steps=steps,
                            early_stop_loss=0.0,
                            context_templates=templates,
                            efficacy_retries=0,
                        )  # the research code retries nothing: equal settings
                    try:
                        ed = check_edits(
                            model, tok, method, layer, device, args.edits, hp, work / "cache"
                        )
                    except Exception as exc:  # report and go on: one failure must not hide the rest
                        print(f"  {method}: FAILED {type(exc).__name__}: {exc}")
                        row[method] = {"error": str(exc)}
                        continue
                    unit = (
                        f" = {ed['s_per_edit'] / ed['fwd_bwd_s']:.1f} forward+backward passes over its prompts ({ed['fwd_bwd_s']:.3f} s each)"
                        if "fwd_bwd_s" in ed
                        else ""
                    )
                    phases = ", ".join(
                        f"{k} {v:.2f}" for k, v in ed["phases"].items() if k != "total"
                    )
                    print(
                        f"  {method}: {ed['s_per_edit']:.2f} s per edit (median of {args.edits}){unit}; phases: {phases}"
                    )
                    row[method] = ed
                results.append(row)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if not args.no_cli:
            print(f"\ncommand line on {device} (small saved Llama):")
            for dtype_name in args.cli_dtypes.split(","):
                for line in cli_checks(str(device), dtype_name, tok, args.smoke, work / dtype_name):
                    print(line.replace("factedit", f"factedit [{dtype_name}]", 1))
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
