"""Submit the sample jobs of ``make demo`` and print their answers."""

from __future__ import annotations

import sys
from pathlib import Path

from glyphq.producer import GlyphqError, submit, submit_document

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
JOBS = [
    ("invoice.png", "What is the total on this invoice?"),
    ("chart.png", "Which day had the most jobs?"),
    ("receipt.png", "How much was paid in total?"),
]
DOCUMENT_QUESTION = "When does the lease end, and what is the yearly rent?"


def main(argv: list[str]) -> int:
    # The tiny model's vision tower and tokenizer are not Glyph's, so neither is its compression figure.
    whose = "the tiny model's figure, not Glyph's" if "--tiny" in argv else "this model's figure"
    jobs = [(name, question, submit(SAMPLES / name, question, max_new_tokens=24, priority=5))
            for name, question in JOBS]
    lease = (SAMPLES / "lease.txt").read_text(encoding="utf-8")
    jobs.append(("lease.txt", DOCUMENT_QUESTION, submit_document(lease, DOCUMENT_QUESTION, max_new_tokens=24)))
    failed = 0
    for name, question, job in jobs:
        try:
            result = job.result(timeout=600)
        except GlyphqError as exc:
            print(f"{name}: FAILED: {exc}")
            failed += 1
            continue
        t = result["timings"]
        print(f"\n{name}  (job {job.id})\n  Q: {question}\n  A: {result['answer']}")
        print(f"  {result['tokens_in']} tokens in, {result['tokens_out']} out; image {result['image_size']} "
              f"-> {result['image_size_used']}; queue {t['queue_s']:.2f} s, generate {t['generate_s']:.2f} s; "
              f"worker pid {result['worker']['pid']} task {result['worker']['task_index']}")
        if "pages" in result:
            print(f"  document: {result['pages']} pages rendered in {t['render_s']:.2f} s; {result['text_tokens']} "
                  f"text tokens read as {result['vision_tokens']} vision tokens ({result['compression']}x: {whose})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
