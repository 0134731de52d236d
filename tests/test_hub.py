from huggingface_hub import EvalResult, ModelCard

from hf_resdecay.hub import (
    load_or_create_card,
    results_to_eval_results,
    save_card_atomic,
    update_card_results,
)

RESULTS = {
    "knn": {"protocol": "DINO weighted kNN, k=20, T=0.07"},
    "linear_probe": {"protocol": "paper"},
    "summary": {"knn_top1": 91.23456, "linear_probe_top1": 93.5, "effective_rank": 12.3},
}


def test_results_become_model_index_entries():
    entries = results_to_eval_results(RESULTS, "embedded:mnist", "test")
    by_type = {(e.metric_type, e.metric_name): e.metric_value for e in entries}
    assert by_type[("accuracy", "kNN top-1 (DINO weighted kNN, k=20, T=0.07)")] == 91.2346
    assert by_type[("accuracy", "linear probe top-1 (paper protocol)")] == 93.5
    assert by_type[("effective_rank", "effective rank (RankMe, last layer)")] == 12.3
    assert all(e.dataset_split == "test" and e.task_type == "image-classification" for e in entries)


def test_merge_replaces_the_same_metric_and_keeps_others(tmp_path):
    card = load_or_create_card(tmp_path)  # a folder without a card: a fresh one
    other = EvalResult(
        "image-classification", "imagenet-1k", "ImageNet", "accuracy", 70.0, metric_name="fine-tune"
    )
    card.data.eval_results = [other]
    update_card_results(card, results_to_eval_results(RESULTS, "embedded:mnist", "test"))
    newer = {**RESULTS, "summary": {"knn_top1": 95.0}}
    update_card_results(card, results_to_eval_results(newer, "embedded:mnist", "test"))
    save_card_atomic(card, tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    values = {(e.dataset_type, e.metric_name): e.metric_value for e in loaded.data.eval_results}
    assert values[("embedded:mnist", "kNN top-1 (DINO weighted kNN, k=20, T=0.07)")] == 95.0
    assert values[("imagenet-1k", "fine-tune")] == 70.0
    assert len(values) == 4 and "model-index" in (tmp_path / "README.md").read_text()
    assert not list(tmp_path.glob("*.partial"))
