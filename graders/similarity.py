"""`text_similarity` metrics, each from a maintained library: rapidfuzz (fuzzy_match), nltk (bleu, gleu) and
rouge-score (rouge_1 … rouge_5, rouge_l). Texts are split on whitespace: nltk's tokenizers need data files
that are not installed. `meteor` needs WordNet's data and `cosine` an embedding model; neither is here."""

from typing import cast

from rapidfuzz import fuzz

from graders.errors import GraderError

UNSUPPORTED = {
    "meteor": "needs the WordNet corpus, which nltk downloads at run time; no maintained PyPI package has it",
    "cosine": "needs an embedding model, and none is registered for graders",
}


def check(metric: str, param: str) -> None:
    if metric in UNSUPPORTED:
        raise GraderError(
            f"evaluation_metric {metric!r} is not available here: it {UNSUPPORTED[metric]}.", param
        )


def similarity(metric: str, text: str, reference: str) -> float:
    """A score in [0, 1]: how close `text` is to `reference` by `metric`."""
    if metric == "fuzzy_match":
        return fuzz.ratio(text, reference) / 100
    # nltk (which rouge-score uses too) takes seconds to import: only a process that grades with it pays.
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from nltk.translate.gleu_score import sentence_gleu
    from rouge_score.rouge_scorer import RougeScorer

    tokens, reference_tokens = text.split(), reference.split()
    if metric == "bleu":
        # Smoothed: a short text with no 4-gram in common scores low rather than 0.
        score = sentence_bleu([reference_tokens], tokens, smoothing_function=SmoothingFunction().method1)
        return float(cast(float, score))  # a number for one set of weights (nltk types every case)
    if metric == "gleu":
        return float(cast(float, sentence_gleu([reference_tokens], tokens)))
    rouge = metric.replace("_", "").replace("rougel", "rougeL")  # rouge_1 → rouge1, rouge_l → rougeL
    return RougeScorer([rouge]).score(reference, text)[rouge].fmeasure
