"""The paper's figures (Tables II and III, Fig. 4), which of our runs stands for each, and the
comparisons the paper draws from them.

Every cell names the run it comes from with a `Tagged` source: `paper` where the paper says
which model the figure is, `ours` (with the reason and the README row) where we had to choose.
The comparisons are the differences the paper's claims rest on (§III-B): M²CNN against
BaseNet+MT, Multi-Task against each single task, and Fig. 4's pairs of equal time; the report
gives each as a paired difference with its confidence interval. Kept free of TensorFlow.
"""

from __future__ import annotations

import dataclasses

from m2cnn_tf.reproduce import protocol
from m2cnn_tf.reproduce.protocol import OURS, Tagged, ours, paper

_CELLS = "which runs fill Table II and Fig. 4"  # the README deviations row of the choices below

ABLATION_INIT_STAGE = ours(
    "stage",
    "an addition no paper reports: the ablation columns start from the previous size like "
    "M²CNN, so that Table II isolates what the Multi-Cell adds beyond fine-tuning",
    topic=_CELLS,
    shown="--ablation-init stage",
)
TABLE2_AT_224 = ours(
    "mt224",
    "Table II does not say which of Fig. 4's two Multi-Task runs at 224 it reports; 224@20k is "
    "the one M²CNN and 448*@32k start from, 224@60k only carries it on",
    topic=_CELLS,
    shown="Table II at 224: 224@20k",
)
TABLE2_AT_448 = ours(
    ("mt448", "m2cnn448"),
    "Table II does not say which of Fig. 4's runs it reports; 448@20k and 448*@32k are the pair "
    "of equal time (4.2 h, 4.0 h) that §III-B compares",
    topic=_CELLS,
    shown="Table II at 448: 448@20k and 448*@32k",
)
TABLE3_BASENET = ours(
    "mse",
    "Table III does not say how its BaseNet was trained; its val figure (0.835) is Table II's "
    "MSE at 720, so its row is our MSE run at 720",
    topic=_CELLS,
    shown="Table III's BaseNet: the MSE run at 720",
)
FIG4_WITHOUT_MULTI_CELL = ours(
    False,
    "Fig. 4 says only 'without fine-tuning'; §III-B finds 'similar results' comparing M²CNN with "
    "BaseNet+MT, and Table II's Multi-Task 448 is then the 448@20k run itself",
    topic=_CELLS,
    shown="Fig. 4's 448@20k and 448@26k without the Multi-Cell",
)
FIG4_SOURCE = paper("multitask", "§III-B: 'All of these results are based on multi-task'")

# ---------------------------------------------------------------------------------------------
# Table II (val, §III-B: "All of these results in Table II and Fig. 4 are evaluated on
# validation set") and Table III (val, test)

TABLE2_COLUMNS: dict[str, tuple[str, str]] = {
    # column: (run name prefix, test method: "scores" or "prob")
    "MSE scores": ("mse", "scores"),
    "CE prob.": ("ce", "prob"),
    "Multi-Task scores": ("mt", "scores"),
    "Multi-Task prob.": ("mt", "prob"),
    "M²CNN scores": ("m2cnn", "scores"),
    "M²CNN prob.": ("m2cnn", "prob"),
}
TABLE2_PAPER: dict[int, dict[str, float | None]] = {  # Table II; None: the paper's "-"
    224: dict(zip(TABLE2_COLUMNS, (0.720, 0.725, 0.742, 0.718, None, None), strict=True)),
    448: dict(zip(TABLE2_COLUMNS, (0.790, 0.772, 0.812, 0.782, 0.830, 0.812), strict=True)),
    720: dict(zip(TABLE2_COLUMNS, (0.835, 0.751, 0.841, 0.826, 0.844, 0.842), strict=True)),
}

# Table III: our three rows are Table II's runs at 720, read from scores (§III-B: "we use
# scores based evaluation").
TABLE3_ROWS: dict[str, str] = {"BaseNet": "mse", "BaseNet+MT": "mt", "M²CNN": "m2cnn"}
TABLE3_PAPER: dict[str, dict[str, float]] = {  # Table III, (val, test)
    "BaseNet": {"val": 0.835, "test": 0.828},
    "BaseNet+MT": {"val": 0.841, "test": 0.838},
    "M²CNN": {"val": 0.844, "test": 0.841},
}
TABLE3_OTHERS: dict[str, dict[str, float]] = {  # Table III's other algorithms, for reference
    "Min-pooling": {"val": 0.860, "test": 0.849},
    "Zoom-in-Net [11]": {"val": 0.857, "test": 0.849},
    "o_O": {"val": 0.854, "test": 0.844},
    "Reformed Gamblers": {"val": 0.851, "test": 0.839},
    "M-Net+A-Net [11]": {"val": 0.837, "test": 0.832},
}


def table2_cell(column: str, size: int, ablation_init: str = "imagenet") -> Tagged | None:
    """The run behind a Table II cell, tagged (None for M²CNN at 224, the paper's "-")."""
    prefix = TABLE2_COLUMNS[column][0]
    if prefix == "m2cnn":
        if size == 224:
            return None
        if size == 448:
            return dataclasses.replace(TABLE2_AT_448, value="m2cnn448")
        return paper("m2cnn720", "§III-A: M²CNN from BaseNet+MT's weights; the chain to 720 px")
    if size != 224 and ablation_init == "stage":
        return dataclasses.replace(ABLATION_INIT_STAGE, value=f"{prefix}{size}_ft")
    if prefix == "mt" and size == 224:
        return TABLE2_AT_224
    if prefix == "mt" and size == 448:
        return dataclasses.replace(TABLE2_AT_448, value="mt448")
    return paper(f"{prefix}{size}", f"Table II: the column's objective at {size} px (§III-A)")


def table2_run(column: str, size: int, ablation_init: str = "imagenet") -> str | None:
    cell = table2_cell(column, size, ablation_init)
    return None if cell is None else cell.value


def table3_cell(row: str, ablation_init: str = "imagenet") -> Tagged:
    """The run behind a Table III row, tagged: Table II's run of the same column at 720."""
    prefix = TABLE3_ROWS[row]
    column = next(c for c, (p, _) in TABLE2_COLUMNS.items() if p == prefix)
    run = table2_run(column, 720, ablation_init) or ""
    if row == "BaseNet":
        return dataclasses.replace(TABLE3_BASENET, value=run)
    where = {"BaseNet+MT": "the BaseNet with the Multi-Task loss", "M²CNN": "M²CNN"}[row]
    source = table2_cell(column, 720, ablation_init)
    if source is not None and source.source == OURS:
        return dataclasses.replace(source, value=run)
    return paper(run, f"Table III: {where}, at 720 px like Table II's last row")


def table3_run(row: str, ablation_init: str = "imagenet") -> str:
    return table3_cell(row, ablation_init).value


# ---------------------------------------------------------------------------------------------
# Fig. 4


@dataclasses.dataclass(frozen=True)
class Fig4Run:
    """One of Fig. 4's runs: its label, the run that trains it, the paper's steps and hours.

    steps and hours count from ImageNet: a 448* run includes 224@20k's steps and time.
    """

    label: str
    run: str
    steps: int
    hours: float


FIG4: tuple[Fig4Run, ...] = (  # Fig. 4's legend
    Fig4Run("224@20k", "mt224", 20000, 1.4),
    Fig4Run("224@60k", "mt224_60k", 60000, 4.2),
    Fig4Run("448@20k", "mt448", 20000, 4.2),
    Fig4Run("448@26k", "mt448_26k", 26000, 5.5),
    Fig4Run("448*@32k", "m2cnn448", 32000, 4.0),
    Fig4Run("448*@40k", "m2cnn448_40k", 40000, 5.5),
)
# §III-B: "448*@32k/4.0h is better than 224@60k/4.2h and 448@20k/4.2h, while 448*@40k/5.5h is
# better than 448@26k/5.5h": (better, worse) by val kappa.
FIG4_CLAIMS: tuple[tuple[str, str], ...] = (
    ("448*@32k", "224@60k"),
    ("448*@32k", "448@20k"),
    ("448*@40k", "448@26k"),
)

# ---------------------------------------------------------------------------------------------
# The comparisons


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A difference the paper draws: kappa of `a` minus kappa of `b` on the same images.

    `a`, `b` name the figures (a Table II column, a Table III row, a Fig. 4 label);
    `paper` is the paper's difference (None where it states only which is better).
    """

    table: str  # table2 | table3 | fig4
    a: str
    b: str
    split: str
    size: int
    way: str  # scores | prob
    paper: float | None
    claim: str


def comparisons() -> tuple[Comparison, ...]:
    """Every comparison of §III-B, in the paper's order."""
    found = []
    t2 = TABLE2_PAPER
    for size in (448, 720):  # "Multi-Cell Architecture Module" on Table II
        for way, tag in (("scores", "scores"), ("prob", "prob.")):
            a, b = f"M²CNN {tag}", f"Multi-Task {tag}"
            found.append(Comparison("table2", a, b, "val", size, way, _minus(t2[size], a, b),
                                    "the Multi-Cell raises kappa (Table II)"))  # fmt: skip
    for size in protocol.SIZES.value:  # "Multi-Task Learning Module"
        for a, b, way in (("Multi-Task scores", "MSE scores", "scores"),
                          ("Multi-Task prob.", "CE prob.", "prob")):  # fmt: skip
            found.append(Comparison("table2", a, b, "val", size, way, _minus(t2[size], a, b),
                                    "multi-task beats the single task (Table II)"))  # fmt: skip
    for a, b in (("M²CNN", "BaseNet+MT"), ("BaseNet+MT", "BaseNet")):  # Table III
        for split in ("val", "test"):
            difference = TABLE3_PAPER[a][split] - TABLE3_PAPER[b][split]
            found.append(Comparison("table3", a, b, split, 720, "scores", round(difference, 3),
                                    f"{a} beats {b} (Table III)"))  # fmt: skip
    for better, worse in FIG4_CLAIMS:  # equal time, Fig. 4
        found.append(Comparison("fig4", better, worse, "val", 448, "scores", None,
                                f"{better} beats {worse} at equal hours (§III-B)"))  # fmt: skip
    return tuple(found)


def _minus(figures: dict[str, float | None], a: str, b: str) -> float | None:
    if figures[a] is None or figures[b] is None:
        return None
    return round(figures[a] - figures[b], 3)


def comparison_runs(c: Comparison, ablation_init: str = "imagenet") -> tuple[str, str]:
    """The runs whose evaluations a comparison sets against each other."""
    if c.table == "table2":
        return table2_run(c.a, c.size, ablation_init), table2_run(c.b, c.size, ablation_init)
    if c.table == "table3":
        return table3_run(c.a, ablation_init), table3_run(c.b, ablation_init)
    runs = {f.label: f.run for f in FIG4}
    return runs[c.a], runs[c.b]


# ---------------------------------------------------------------------------------------------
# Every tagged value, and the README rows that state ours


def tagged_values() -> dict[str, Tagged]:
    """Every tagged value of the reproduction by a dotted name (plan.json, the README check)."""
    return {
        **protocol.tagged_values(),
        "ablation_init_stage": ABLATION_INIT_STAGE,
        "table2_at_224": TABLE2_AT_224,
        "table2_at_448": TABLE2_AT_448,
        "table3_basenet": TABLE3_BASENET,
        "fig4_without_multi_cell": FIG4_WITHOUT_MULTI_CELL,
        "fig4_loss": FIG4_SOURCE,
    }


def deviation_rows() -> dict[str, list[str]]:
    """The README deviations table's rows the reproduction needs: topic -> the texts its "here"
    cell must hold, one per `ours` value."""
    rows: dict[str, list[str]] = {}
    for value in tagged_values().values():
        if value.source == OURS:
            rows.setdefault(value.topic, []).append(value.rendered())
    return rows
