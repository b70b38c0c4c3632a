"""``tbt generate --model PACKED --prompt TEXT``: decode with the native engine, streaming.

The packed checkpoint runs on :class:`tbt.runtime.engine.Engine` (every layer of a step in
one C call; no torch needed): greedy by default, or sampled (``--do-sample`` with
``--temperature``, ``--top-k``, ``--top-p``, ``--seed``). Text is printed as it is decoded;
the timing (prefill and decoding tokens/s) goes to stderr. The tokenizer is read from the
checkpoint directory (``tokenizer.json``, with the ``tokenizers`` library, or any tokenizer
``transformers`` loads); ``--prompt-ids`` takes token ids instead and prints ids.

An encoder-decoder checkpoint (BART, mBART, Marian) takes the prompt as the source (tokenized
with the tokenizer's special tokens) and prints the summary / translation; ``--num-beams N``
runs beam search (printed when done, not streamed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text from a packed checkpoint on the native engine",
        description="Decode a packed checkpoint with tbt's native engine: one C call per token, "
                    "output streamed. Decoder-only (Llama, Qwen2, Mistral, SmolLM2): the prompt "
                    "is continued; encoder-decoder (BART, mBART, Marian): the prompt is the "
                    "source, the output its summary or translation.")
    p.add_argument("--model", required=True, metavar="PACKED",
                   help="packed checkpoint directory (tbt export / save_packed)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt text from FILE")
    src.add_argument("--prompt-ids", metavar="IDS",
                     help="comma-separated token ids (no tokenizer needed; prints ids)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer directory (default: the checkpoint directory)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-new-tokens", type=int, default=0,
                   help="suppress the end-of-sequence token before this many new tokens")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0: off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible runs)")
    p.add_argument("--threads", type=int, default=None,
                   help="kernel threads (default: $TBT_NUM_THREADS or every CPU)")
    p.add_argument("--num-beams", type=int, default=None,
                   help="encoder-decoder checkpoints: beam search with N beams (default: the "
                        "checkpoint's generation_config, else greedy)")
    p.add_argument("--no-bos", action="store_true",
                   help="do not prepend the tokenizer's BOS token to the prompt")
    p.set_defaults(func=run)


class _Tok:
    """encode/decode through ``tokenizers`` (tokenizer.json) or transformers."""

    def __init__(self, directory: Path, special: bool = False) -> None:
        self.bos = None
        if (directory / "tokenizer.json").is_file():
            try:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
                self._enc = lambda s: tok.encode(s, add_special_tokens=special).ids
                self._dec = lambda ids: tok.decode(ids, skip_special_tokens=True)
                return
            except ImportError:
                pass
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(directory)
        except Exception as e:  # noqa: BLE001 -- any failure: no usable tokenizer there
            raise ValueError(f"no tokenizer in {directory} ({type(e).__name__}); pass "
                             f"--tokenizer DIR or give --prompt-ids") from None
        self.bos = None if special else tok.bos_token_id
        self._enc = lambda s: tok.encode(s, add_special_tokens=special)
        self._dec = lambda ids: tok.decode(ids, skip_special_tokens=True)

    def encode(self, s: str) -> list[int]:
        return list(self._enc(s))

    def decode(self, ids: list[int]) -> str:
        return self._dec(ids)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from tbt.runtime.engine import Engine

    model = Path(args.model)
    if args.num_beams is not None and args.num_beams < 1:
        raise ValueError("--num-beams must be >= 1")
    if not model.is_dir():
        raise ValueError(f"--model {model}: no such directory (a packed checkpoint: "
                         f"tbt export --output-dir DIR)")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    eng = Engine.from_packed_dir(model, threads=args.threads)
    s2s = getattr(eng, "is_encoder_decoder", False)
    if args.num_beams is not None and not s2s:
        raise ValueError("--num-beams: beam search runs on encoder-decoder checkpoints (BART, "
                         "mBART, Marian); decode this one greedily or with --do-sample")
    tok = None
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise ValueError(f"--prompt-ids {args.prompt_ids!r}: write comma-separated "
                             f"integers, e.g. 1,42,7") from None
    else:
        text = args.prompt
        if args.prompt_file is not None:
            path = Path(args.prompt_file)
            if not path.is_file():
                raise ValueError(f"--prompt-file {path}: no such file")
            text = path.read_text()
        tok = _Tok(Path(args.tokenizer) if args.tokenizer else model, special=s2s)
        ids = tok.encode(text)
        bos = tok.bos
        if bos is not None and not args.no_bos and (not ids or ids[0] != bos):
            ids = [bos, *ids]
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    if max(ids) >= eng.vocab_size or min(ids) < 0:
        raise ValueError(f"prompt token ids must be in [0, {eng.vocab_size})")
    out: list[int] = []
    shown = ""
    t0 = time.perf_counter()
    t_first = None
    opts = dict(min_new_tokens=args.min_new_tokens, do_sample=args.do_sample,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    beam_run = False
    if s2s:
        beams = args.num_beams or int(eng.generation_config.get("num_beams") or 1)
        if beams > 1:
            if args.do_sample:
                raise ValueError("--do-sample with beam search is not in the engine: pass "
                                 "--num-beams 1 to sample")
            seq = eng.generate(np.array([ids]), None, args.max_new_tokens, num_beams=beams,
                               min_new_tokens=args.min_new_tokens)[0, 1:]
            steps = iter([np.array([t]) for t in seq.tolist()])
            beam_run = True
        else:
            steps = eng.stream(np.array([ids]), None, args.max_new_tokens, num_beams=1, **opts)
    else:
        steps = eng.stream(np.array([ids]), args.max_new_tokens, **opts)
    for nxt in steps:
        if t_first is None:
            t_first = time.perf_counter()
        out.append(int(nxt[0]))
        if tok is None:
            print(out[-1], end=" ", flush=True)
        else:
            text = tok.decode(out)
            if text.startswith(shown):  # print only what is new (UTF-8 pieces may wait)
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
    t_end = time.perf_counter()
    print()
    n = len(out)
    prefill = (t_first or t_end) - t0
    if beam_run:
        print(f"[{len(ids)} source tokens; beam search: {n} new tokens in "
              f"{(t_end - t0) * 1e3:.1f} ms, {n / max(t_end - t0, 1e-9):.1f} tokens/s]",
              file=sys.stderr)
        return 0
    rate = (n - 1) / (t_end - t_first) if n > 1 and t_first and t_end > t_first else 0.0
    what = "source" if s2s else "prompt"
    print(f"[{len(ids)} {what} tokens in {prefill * 1e3:.1f} ms; {n} new tokens, "
          f"{rate:.1f} tokens/s decoding]", file=sys.stderr)
    return 0
