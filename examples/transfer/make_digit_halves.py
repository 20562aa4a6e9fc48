"""Make the two data sets of the transfer-learning example: digits_0to4.npz and digits_5to9.npz.

- Source: the 1,797 handwritten digits bundled with scikit-learn (`load_digits`: 8×8 grey
  images, values 0..16, as the built-in `digits` source gives them; UCI optdigits, BSD licence
  as part of scikit-learn).
- digits_0to4.npz: the 901 images of the digits 0–4, labels 0..4 (the source task).
- digits_5to9.npz: the 896 images of the digits 5–9, labels 0..4 standing for 5..9 (the new
  task; its programs name the classes five ... nine). Its programs train on 10% of it
  (`split train=0.1`) and measure on the rest.
- Arrays: x float32 (n, 1, 8, 8), y int64 (n,). Nothing is shuffled here: the programs' splits
  shuffle with their seeds.

Run it from anywhere with the project's environment: `python examples/transfer/make_digit_halves.py`.
It writes the two files beside itself; the output is the same every time.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits


def main() -> None:
    digits = load_digits()
    x = digits.data.astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    here = Path(__file__).resolve().parent
    low = y < 5
    np.savez_compressed(here / "digits_0to4.npz", x=x[low], y=y[low])
    np.savez_compressed(here / "digits_5to9.npz", x=x[~low], y=y[~low] - 5)
    print(f"wrote {here / 'digits_0to4.npz'} ({low.sum()} images) and {here / 'digits_5to9.npz'} "
          f"({(~low).sum()} images)")


if __name__ == "__main__":
    main()
