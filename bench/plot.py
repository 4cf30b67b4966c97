"""The SQuAD bench plot: scores, tokens and latency against the group size G.

matplotlib is imported here only, and only when a plot is asked for (`--plot`), so the bench
runs without it otherwise.
"""

from __future__ import annotations

from pathlib import Path


def plot_summaries(path: str | Path, summaries: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    sizes = [s["group_size"] for s in summaries]
    figure, (scores, tokens, latency) = plt.subplots(1, 3, figsize=(13, 4))
    for key, label in [("em", "EM"), ("f1", "F1"), ("lenient", "lenient")]:
        scores.plot(sizes, [s[key] for s in summaries], marker="o", label=label)
    scores.set(title="Scores", xlabel="group size G", ylim=(0, 1))

    for key, label in [
        ("billed_per_question", "prompt, billed"),
        ("computed_per_question", "prompt, computed"),
        ("generated_per_question", "generated"),
    ]:
        tokens.plot(sizes, [s[key] for s in summaries], marker="o", label=label)
    tokens.set(title="Tokens per question", xlabel="group size G", ylim=(0, None))

    for key, label in [
        ("latency_mean_s", "group latency, mean"),
        ("latency_p99_s", "group latency, p99"),
        ("ttft_mean_s", "time to first token, mean"),
    ]:
        if all(s[key] is not None for s in summaries):
            latency.plot(sizes, [s[key] for s in summaries], marker="o", label=label)
    latency.plot(sizes, [s["wall_s"] / s["num_questions"] for s in summaries], marker="o",
                 label="wall time per question")
    latency.set(title="Latency (s)", xlabel="group size G", ylim=(0, None))

    for axes in (scores, tokens, latency):
        axes.set_xticks(sizes)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
