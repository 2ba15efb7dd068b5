"""The harm-keyed opt-in: which layer inputs' harm keys pass the frontier issue's bars, and the methods
that train with a key there as the only freedom.

`make bench-harm-keys` measures, per decoder layer and layer input of SmolLM2 (development sets only),
how well the harm key `k = (C_ref + μI)⁻¹ d` separates the unseen area's requests in HarmBench's form
from general prompts and look-alikes (AUROC) and how much of it general inputs carry (leak). A keyed
freedom is only worth giving where both bars pass; the drivers that train with it (`make bench-real`'s
opt-in row, `make bench-unseen`'s `keys-select` sweeps) read the selection here, from the committed
file, so a training run never re-derives it from data it then evaluates on.
"""

from __future__ import annotations

import dataclasses
import json
import os

from benchmarks.real import Method

TARGET = "unseen area, HarmBench's form"  # the set a harm key must separate (`make bench-harm-keys`)
AUROC_BAR, LEAK_BAR = 0.85, 0.2  # the frontier issue's falsification thresholds for a harm key
HARM_KEYS_RESULTS = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "results", "harm_keys_cpu.json")
# Which Linears read each layer input `make bench-harm-keys` measures (gate and up share the MLP's input).
KEYED_LINEARS = {"MLP in": ("mlp.gate_proj", "mlp.up_proj"), "down_proj in": ("mlp.down_proj",)}


def passing_layers(rows: list[dict], input_name: str) -> list[int]:
    """The layers whose harm key at `input_name` passes both of the issue's bars: it separates the unseen
    area's requests in HarmBench's form from general prompts and look-alikes (AUROC ≥ 0.85) and general
    inputs carry little of it (leak ≤ 0.2). `rows` are `make bench-harm-keys`' per-layer measurements."""
    return [
        row["layer"]
        for row in rows
        if row["input"] == input_name and row["auroc"][TARGET] >= AUROC_BAR and row["leak"] <= LEAK_BAR
    ]


def low_leak_keyed_linears(results_path: str = HARM_KEYS_RESULTS) -> list[str]:
    """`nullspace_exempt_modules` suffixes for the MLP Linears whose input's harm key passed both bars in
    the committed `make bench-harm-keys` measurement (development sets only), so a keyed freedom goes
    only where it separates harm and general inputs barely carry it."""
    with open(results_path) as handle:
        rows = json.load(handle)["rows"]
    return [
        f"layers.{layer}.{linear}"
        for input_name, linears in KEYED_LINEARS.items()
        for layer in passing_layers(rows, input_name)
        for linear in linears
    ]


def low_leak_keys(retain_weight: float | None = None) -> Method:
    """The frontier issue's best opt-in on its development proxy (`make bench-unseen`, sweeps `keys-select` and
    `keys-select-kl`; docs/results/real_levers.md): every reference direction protected (energy 1.0) except one
    harm key per MLP input at the low-leak layers; with `retain_weight`, a KL retain loss on the general answers
    too. Built when a sweep asks (it reads the committed measurement), so `make bench-harm-keys`, which writes
    that measurement, never needs it to import."""
    keys = Method(
        "harm keys only, low-leak layers (energy 1.0)",
        null_space=True,
        settings={"nullspace_energy": 1.0, "nullspace_exempt_modules": low_leak_keyed_linears()},
        exempt=True,
    )
    if retain_weight is None:
        return keys
    return dataclasses.replace(
        keys,
        name=f"harm keys only, low-leak layers + KL retain {retain_weight:g}",
        baseline="kl-retain",
        retain_weight=retain_weight,
    )
