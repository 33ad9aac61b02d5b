"""The `tandem` command line. Light: heavy modules are imported inside the subcommand that needs
them, so `tandem generate --url` runs on the SDK install (grpcio + protobuf) alone."""
from __future__ import annotations

import argparse
import json
import sys

from tandem import models
from tandem.errors import TandemError
from tandem.params import MODES

SERVER_EXTRA = "pip install 'tandem[server]'"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_arguments(sub.add_parser("generate", help="generate text in-process, or on a server with --url"))
    serve_parser = sub.add_parser("serve", help="deploy a Serve config (e.g. deploy/cluster.yaml) in the "
                                  "foreground; exits with the reason if the deploy fails")
    serve_parser.add_argument("config", help="a Serve deploy config (applications, http_options)")
    serve_parser.add_argument("--address", default=None, help="Ray cluster to use (default: $RAY_ADDRESS, "
                              "else a local one is started)")
    sub.add_parser("zoo", add_help=False, help="train the project's own target/draft model pair "
                   "(`tandem zoo --help`; needs the server extra)")
    try:
        if argv[:1] == ["zoo"]:  # its own parser, in its own module (torch)
            return run_zoo(argv[1:])
        args = parser.parse_args(argv)
        if args.command == "serve":
            return run_serve(args)
        return run_generate(args)
    except TandemError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2


def run_serve(args: argparse.Namespace) -> int:
    try:
        from tandem.cluster.launch import serve_config
    except ImportError as e:
        return needs_server_extra("tandem serve", e)
    return serve_config(args.config, args.address)


def run_zoo(argv: list[str]) -> int:
    try:
        from tandem import zoo
    except ImportError as e:
        return needs_server_extra("tandem zoo", e)
    return zoo.main(argv)


def needs_server_extra(what: str, e: ImportError) -> int:
    """One line instead of a traceback where the SDK-only install lacks torch / transformers."""
    print(f"tandem: error: {what} needs the server extra ({e.name or e} is not installed): {SERVER_EXTRA}",
          file=sys.stderr)
    return 2


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=models.TINY_TARGET,
                   help="target checkpoint folder, or tandem:<name> for one shipped in the package "
                        f"(default: {models.TINY_TARGET}, the tiny pair)")
    p.add_argument("--draft", default=models.TINY_DRAFT, help=f"draft checkpoint folder (default: {models.TINY_DRAFT})")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--mode", choices=MODES, default="sd",
                   help="sd (default): draft --max-draft tokens, then verify; pearl: draft beside the verify; ar: the "
                        "target alone; auto (experimental): each step's draft length chosen for the batch")
    p.add_argument("--max-draft", type=int, default=5, help="SD draft length k / PEARL window (auto: the longest)")
    p.add_argument("--adaedl", action=argparse.BooleanOptionalAction, default=False,
                   help="entropy-based early draft stop (AdaEDL)")
    p.add_argument("--adaedl-lambda", type=float, default=None, help="AdaEDL initial threshold λ0")
    p.add_argument("--adaedl-stop", choices=["cost", "paper"], default="cost",
                   help="cost: end a draft where one more token no longer pays for itself (acceptance by "
                        "entropy learned online); paper: AdaEDL's threshold λ")
    p.add_argument("--adaedl-cost-ratio", type=float, default=None, metavar="C",
                   help="(step time + drafting's fixed part) / one more draft token's time, for the cost stop "
                        "(default: measured as it runs)")
    p.add_argument("--one-hot-drafts", action="store_true", help="send greedy drafts without q (docs/design.md §3)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--engine", default="auto", choices=["auto", "native", "hf"])
    p.add_argument("--exact", action="store_true",
                   help="the target's logits independent of batch and draft length: greedy output identical in every "
                        "mode, also in bf16 (native engine; tandem/kernels/exact.py)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--url", default=None, metavar="HOST:PORT",
                   help="generate on a running tandem server over gRPC (e.g. 127.0.0.1:9000) instead of "
                        "in-process; --target/--draft/--device/--dtype/--engine/--adaedl-*/"
                        "--one-hot-drafts are then the server's business and ignored")


def run_generate(args: argparse.Namespace) -> int:
    if args.url and args.exact:
        print("tandem generate: --exact applies in process; a server is exact when its config sets model.exact",
              file=sys.stderr)
        return 2
    if args.url:
        return run_remote_generate(args)
    try:
        from tandem.actors.offline import generate
        from tandem.engine.pair import load_pair
        from tandem.spec.adaedl import AdaEDLConfig
    except ImportError as e:
        return needs_server_extra("generating in-process (without --url)", e)
    from tandem.params import SamplingParams, SpecParams

    sampling = SamplingParams(args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed).validate()
    spec = SpecParams(args.mode, args.max_draft, args.adaedl, not args.one_hot_drafts).validate()
    lam = {} if args.adaedl_lambda is None else {"lambda0": args.adaedl_lambda}
    adaedl = AdaEDLConfig(stop=args.adaedl_stop, cost_ratio=args.adaedl_cost_ratio, **lam)
    pair = load_pair(args.target, args.draft, device=args.device, dtype=args.dtype, engine=args.engine, max_slots=1,
                     exact=args.exact)
    prompt = pair.tokenizer.encode(args.prompt, add_special_tokens=False)
    # PEARL drafts on a background CUDA stream while the verifier runs (in-process overlap).
    overlap = spec.mode == "pearl" and pair.draft.device.type == "cuda"
    done = generate(pair, [prompt], sampling, spec, adaedl, overlap=overlap)[0]
    text = pair.tokenizer.decode(done.token_ids, skip_special_tokens=True)
    stats = done.stats.as_dict()
    if args.json:
        print(json.dumps({"token_ids": done.token_ids, "text": text, "finish_reason": done.finish_reason,
                          "mode": args.mode, "stats": stats}))
    else:
        print(args.prompt + text)
        print(f"[{args.mode}] {stats['generated']} tokens, {stats['steps']} verifier steps, acceptance "
              f"{stats['acceptance_rate']:.2f}, {stats['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    return 0


def run_remote_generate(args: argparse.Namespace) -> int:
    """`tandem generate --url`: stream from a server with the SDK (grpcio only, no torch or ray)."""
    from google.protobuf.json_format import MessageToDict

    from tandem.client import TandemClient, TandemClientError

    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  seed=args.seed, mode=args.mode, max_draft=args.max_draft, adaedl=args.adaedl)
    ids, text, finish, stats = [], "", "", None
    try:
        with TandemClient(args.url, retries=0) as client:
            for chunk in client.generate(args.prompt, **kwargs):
                if not args.json:  # stream the text as it is verified, after the prompt
                    print(("" if ids else args.prompt) + chunk.text, end="", flush=True)
                ids += chunk.token_ids
                text += chunk.text
                if chunk.finish_reason:
                    finish, stats = chunk.finish_reason, chunk.stats
    except TandemClientError as e:
        raise TandemError(f"server {args.url} answered {e}") from None
    stats = (MessageToDict(stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
             if stats else {})
    if args.json:
        print(json.dumps({"token_ids": ids, "text": text, "finish_reason": finish, "mode": args.mode, "stats": stats}))
    else:
        print()
        print(f"[{args.mode} @ {args.url}] {stats.get('generated', len(ids))} tokens, {stats.get('steps', 0)} "
              f"verifier steps, acceptance {stats.get('acceptance_rate', 0.0):.2f}, "
              f"{stats.get('tokens_per_s', 0.0):.1f} tokens/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
