"""Constrained-decoding libraries on CPU with our LLM: setup time and per-token mask overhead.

    python benchmarks/report_constrained.py [--checkpoint demo] [--repeats 20]

For each library (lm-format-enforcer, xgrammar, outlines-core; those not installed are skipped) it measures
- ``tokenizer_s``: building the library's view of the vocabulary (once per tokenizer),
- ``compile_s``: compiling the report fields' regular expressions (per schema),
- ``mask_ms``: computing the allowed-token mask for one step and applying it to a logits row, averaged over the
  tokens of valid answers (the work added to every generated token),
next to ``llm_step_ms``, one KV-cached decoding step of the checkpoint's LLM. Prints one JSON line per library.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

REGEXES = {
    "tissue_types": r"(fibrous stroma|normal glands|tumour|necrosis|lymphocyte-rich infiltrate|adipose tissue)"
                    r"(, (fibrous stroma|normal glands|tumour|necrosis|lymphocyte-rich infiltrate|adipose tissue)){0,5}",
    "lesion_type": r"(carcinoma \(tumour focus\)|necrotic focus|lymphoid aggregate|none)",
    "tumor_fraction_percent": r"(100|[1-9]?[0-9])%",
}
ANSWERS = {
    "tissue_types": "fibrous stroma, normal glands, lymphocyte-rich infiltrate, adipose tissue",
    "lesion_type": "carcinoma (tumour focus)",
    "tumor_fraction_percent": "35%",
}


def _byte_level_inverse() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character that stands for each byte -> the byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _byte_vocabulary(tokenizer) -> dict[int, bytes]:
    """Token id -> the bytes it stands for (byte-level BPE vocabularies)."""
    inv = _byte_level_inverse()
    out = {}
    for tid in range(len(tokenizer)):
        tok = tokenizer.convert_ids_to_tokens(tid)
        if tok is None:
            continue
        try:
            out[tid] = bytes(inv[c] for c in tok)
        except KeyError:
            out[tid] = tok.encode()
    return out


def _lmfe_tokenizer_data(tokenizer, vocab_size):
    """lm-format-enforcer's tokenizer data (its transformers integration module does not import on transformers 5,
    so this is its ``build_token_enforcer_tokenizer_data`` written out)."""
    from lmformatenforcer import TokenEnforcerTokenizerData

    token_0 = tokenizer.encode("0")[-1]
    special = set(tokenizer.all_special_ids)
    regular = []
    for tid in range(vocab_size):
        if tid in special:
            continue
        after_0 = tokenizer.decode([token_0, tid])[1:]
        regular.append((tid, after_0, len(after_0) > len(tokenizer.decode([tid]))))
    return TokenEnforcerTokenizerData(regular, lambda ids: tokenizer.decode(ids).rstrip("\ufffd"),
                                      tokenizer.eos_token_id, False, vocab_size)


def bench_lmfe(tokenizer, vocab_size, stop, repeats):
    from lmformatenforcer import RegexParser, TokenEnforcer

    t = time.perf_counter()
    data = _lmfe_tokenizer_data(tokenizer, vocab_size)
    tok_s = time.perf_counter() - t
    t = time.perf_counter()
    enforcers = {k: TokenEnforcer(data, RegexParser(r)) for k, r in REGEXES.items()}
    compile_s = time.perf_counter() - t
    logits = torch.randn(vocab_size)
    steps, elapsed = 0, 0.0
    for _ in range(repeats):
        enforcers = {k: TokenEnforcer(data, RegexParser(r)) for k, r in REGEXES.items()}  # fresh state caches
        for k, ans in ANSWERS.items():
            ids = tokenizer.encode(ans, add_special_tokens=False) + [min(stop)]
            for i in range(len(ids)):
                t = time.perf_counter()
                allowed = enforcers[k].get_allowed_tokens(ids[:i])
                mask = torch.full_like(logits, float("-inf"))
                idx = allowed.allowed_tokens if hasattr(allowed, "allowed_tokens") else allowed
                if isinstance(idx, torch.Tensor) and idx.dtype == torch.int32:  # bitmask form
                    bits = ((idx[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab_size]
                    mask[bits.bool()] = 0
                else:
                    mask[torch.as_tensor(list(idx), dtype=torch.long)] = 0
                _ = logits + mask
                elapsed += time.perf_counter() - t
                steps += 1
    return tok_s, compile_s, 1000 * elapsed / steps


def bench_xgrammar(tokenizer, vocab_size, stop, repeats):
    import xgrammar as xgr

    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop))
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    tok_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled = {k: compiler.compile_regex(r) for k, r in REGEXES.items()}
    compile_s = time.perf_counter() - t
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    steps, elapsed = 0, 0.0
    for _ in range(repeats):
        for k, ans in ANSWERS.items():
            matcher = xgr.GrammarMatcher(compiled[k])
            ids = tokenizer.encode(ans, add_special_tokens=False) + [min(stop)]
            for tid in ids:
                logits = torch.randn(1, vocab_size)
                t = time.perf_counter()
                matcher.fill_next_token_bitmask(bitmask)
                xgr.apply_token_bitmask_inplace(logits, bitmask)
                assert matcher.accept_token(tid), (k, tid)
                elapsed += time.perf_counter() - t
                steps += 1
    return tok_s, compile_s, 1000 * elapsed / steps


def bench_outlines(tokenizer, vocab_size, stop, repeats):
    from outlines_core import Guide, Index, Vocabulary

    t = time.perf_counter()
    by_bytes: dict[bytes, list[int]] = {}
    eos = min(stop)
    for tid, b in _byte_vocabulary(tokenizer).items():
        if tid not in stop and tid < vocab_size:
            by_bytes.setdefault(b, []).append(tid)
    vocab = Vocabulary(eos, by_bytes)
    tok_s = time.perf_counter() - t
    t = time.perf_counter()
    indexes = {k: Index(r, vocab) for k, r in REGEXES.items()}
    compile_s = time.perf_counter() - t
    steps, elapsed = 0, 0.0
    for _ in range(repeats):
        for k, ans in ANSWERS.items():
            guide = Guide(indexes[k])
            ids = tokenizer.encode(ans, add_special_tokens=False) + [eos]
            for tid in ids:
                logits = torch.randn(vocab_size)
                t = time.perf_counter()
                allowed = guide.get_tokens()
                mask = torch.full_like(logits, float("-inf"))
                mask[torch.as_tensor(allowed, dtype=torch.long)] = 0
                _ = logits + mask
                if tid != eos:
                    guide.advance(tid)
                elapsed += time.perf_counter() - t
                steps += 1
    return tok_s, compile_s, 1000 * elapsed / steps


def llm_step_ms(llm, repeats: int = 30) -> float:
    from slidechat.model.llm import cache_kwarg

    with torch.no_grad():
        out = llm(input_ids=torch.arange(100, 400)[None], use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        t = time.perf_counter()
        for i in range(repeats):
            out = llm(input_ids=torch.tensor([[500 + i]]), use_cache=True, logits_to_keep=1,
                      **{cache_kwarg(llm): cache})
            cache = getattr(out, "cache", None) or out.past_key_values
    return 1000 * (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="demo")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    import slidechat

    model = slidechat.load(args.checkpoint).model
    tokenizer = model.processor.tokenizer
    vocab_size = int(model.llm.get_input_embeddings().weight.shape[0])
    stop = set(model.processor.stop_token_ids())
    step = llm_step_ms(model.llm)
    for name, fn in (("lm-format-enforcer", bench_lmfe), ("xgrammar", bench_xgrammar),
                     ("outlines-core", bench_outlines)):
        try:
            tok_s, compile_s, mask_ms = fn(tokenizer, vocab_size, stop, args.repeats)
        except ImportError as exc:
            print(json.dumps({"library": name, "skipped": str(exc)}))
            continue
        except Exception as exc:  # a library that cannot follow a valid answer is reported, not fatal
            print(json.dumps({"library": name, "failed": f"{type(exc).__name__}: {exc}"}))
            continue
        print(json.dumps({"library": name, "tokenizer_s": round(tok_s, 3), "compile_s": round(compile_s, 3),
                          "mask_ms": round(mask_ms, 3), "llm_step_ms": round(step, 2)}), flush=True)


if __name__ == "__main__":
    main()
