"""`fedlora generate`: ask a signed adapter version questions on this machine (fedlora/generate.py).

The questions are read and checked before the model loads, so a bad line fails in a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _generate(args: argparse.Namespace) -> int:
    from fedlora.generate import answer_all, open_version, question_example, read_questions, write_answers
    from fedlora.registry import find_public_key, version_directory

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    source = version_directory(args.version, Path(args.run))
    key = Path(args.public_key) if args.public_key else find_public_key(source)
    items = read_questions(Path(args.input)) if args.input else [{"prompt": args.prompt}]
    if args.prompt is not None:
        question_example(items[0], "--prompt")
    personal = Path(args.personal) if args.personal else None
    answerer = open_version(source, key.read_bytes(), args.base, args.quantization, args.force, Path(args.run), personal)
    answered = answer_all(answerer, items, args.max_new_tokens)
    if args.output:
        write_answers(Path(args.output), answered)
        print(f"{len(answered)} answers from {source} (verified against {key}) written to {args.output}", file=sys.stderr)
    elif args.prompt is not None:
        print(answered[0]["answer"])
    else:
        for item in answered:
            print(json.dumps(item, ensure_ascii=False))
    return 0


def add_generate_command(commands: argparse._SubParsersAction) -> None:
    from fedlora.generate import QUANTIZATIONS

    generate = commands.add_parser(
        "generate", help="answer questions with a verified adapter version on this machine (needs only the version and coordinator.pub)"
    )
    generate.add_argument("version", help="an adapter directory, or a version name (round-0003, final) in --run")
    question = generate.add_mutually_exclusive_group(required=True)
    question.add_argument("--prompt", help="one question; its answer is printed")
    question.add_argument(
        "--input", help="a .jsonl file: one object a line with 'prompt' (or 'question' / 'instruction', and an optional 'input')"
    )
    generate.add_argument("--output", help="write the questions with their 'answer' here as JSONL (default: print them)")
    generate.add_argument("--run", default=".", help="run directory holding adapters/ (default: .)")
    generate.add_argument("--public-key", help="the coordinator's coordinator.pub (default: found above the version)")
    generate.add_argument("--force", action="store_true", help="answer with a withdrawn version anyway (it still must verify)")
    generate.add_argument("--base", help="base model (default: the manifest's facts.base_model); its fingerprint must match")
    generate.add_argument(
        "--personal", metavar="DIR", help="answer with this site's personalised adapter of the version's run "
        "(personal/<run>/round-NNNN); the version still must verify and gives the prompt format, classes and base"
    )
    generate.add_argument(
        "--quantization", choices=tuple(QUANTIZATIONS), default="nf4", help="how the base loads: nf4 (default, as training), bf16 or none (float32)"
    )
    generate.add_argument("--max-new-tokens", type=int, default=32, help="longest generated answer in tokens (default 32)")
    generate.set_defaults(handler=_generate)
