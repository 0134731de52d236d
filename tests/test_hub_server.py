"""Drive the real ``huggingface_hub`` / ``transformers`` clients against the fake Hub of ``hub_server.py``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

from .hub_server import HubRequestHandler, HubServer

REPO = "org/demo"


@pytest.fixture(scope="module")
def api(hub_server: HubServer) -> HfApi:
    assert os.environ["HF_ENDPOINT"] == hub_server.url
    return HfApi()


@pytest.fixture(scope="module")
def demo(api: HfApi, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``org/demo`` with a small text file, a nested json file and a >1 MB safetensors file on ``main``."""
    folder = tmp_path_factory.mktemp("demo")
    (folder / "notes.txt").write_text("hello hub\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "config.json").write_text('{"a": 1}')
    (folder / "model.safetensors").write_bytes(os.urandom(1_500_000))
    api.create_repo(REPO, exist_ok=True)
    api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="add files")
    return folder


def test_create_repo_exist_ok(api: HfApi) -> None:
    first = api.create_repo("org/created", exist_ok=True)
    second = api.create_repo("org/created", exist_ok=True)
    assert first.repo_id == second.repo_id == "org/created"
    with pytest.raises(HfHubHTTPError) as info:
        api.create_repo("org/created")
    assert info.value.response.status_code == 409


def test_private_repo_needs_a_token(api: HfApi) -> None:
    api.create_repo("org/secret", private=True, exist_ok=True)
    assert api.model_info("org/secret").private is True
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/secret", token=False)


def test_whoami(api: HfApi) -> None:
    assert api.whoami()["name"] == "org"


def test_upload_uses_regular_and_lfs_paths(api: HfApi, demo: Path, hub_server: HubServer) -> None:
    info = api.model_info(REPO, files_metadata=True)
    by_name = {s.rfilename: s for s in info.siblings}
    assert by_name["notes.txt"].lfs is None
    assert by_name["model.safetensors"].lfs is not None
    assert by_name["model.safetensors"].lfs.size == 1_500_000
    assert hub_server.store.has_blob(by_name["model.safetensors"].lfs.sha256, 1_500_000)


def test_download_both_files(demo: Path, tmp_path: Path) -> None:
    for name in ("notes.txt", "model.safetensors", "sub/config.json"):
        expected = (demo / name).read_bytes()
        assert Path(hf_hub_download(REPO, name)).read_bytes() == expected
        fresh = hf_hub_download(REPO, name, cache_dir=tmp_path / "fresh-cache")
        assert Path(fresh).read_bytes() == expected


def test_model_info_siblings_and_sha(api: HfApi, demo: Path) -> None:
    info = api.model_info(REPO)
    names = {s.rfilename for s in info.siblings}
    assert names == {".gitattributes", "notes.txt", "model.safetensors", "sub/config.json"}
    assert info.id == REPO and len(info.sha) == 40


def test_refs_and_commits(api: HfApi, demo: Path) -> None:
    head = api.model_info(REPO, revision="main").sha
    refs = api.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches}["main"] == head
    commits = api.list_repo_commits(REPO)
    assert commits[0].commit_id == head and commits[0].title == "add files"
    assert commits[-1].title == "initial commit"


def test_list_files_and_tree(api: HfApi, demo: Path) -> None:
    assert sorted(api.list_repo_files(REPO)) == [
        ".gitattributes",
        "model.safetensors",
        "notes.txt",
        "sub/config.json",
    ]
    top = {entry.path for entry in api.list_repo_tree(REPO)}
    assert top == {".gitattributes", "model.safetensors", "notes.txt", "sub"}
    assert [entry.path for entry in api.list_repo_tree(REPO, path_in_repo="sub")] == ["sub/config.json"]
    paths = api.get_paths_info(REPO, ["notes.txt", "sub", "missing.txt"])
    assert sorted(p.path for p in paths) == ["notes.txt", "sub"]


def test_snapshot_download(demo: Path, tmp_path: Path) -> None:
    local = Path(snapshot_download(REPO, cache_dir=tmp_path))
    for name in ("notes.txt", "model.safetensors", "sub/config.json"):
        assert (local / name).read_bytes() == (demo / name).read_bytes()
    only_json = Path(snapshot_download(REPO, allow_patterns="*.json", local_dir=tmp_path / "json"))
    assert (only_json / "sub" / "config.json").exists() and not (only_json / "notes.txt").exists()


def test_branch_tag_and_revision_download(api: HfApi, demo: Path) -> None:
    api.create_branch(REPO, branch="dev", exist_ok=True)
    api.upload_file(path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id=REPO, revision="dev")
    assert Path(hf_hub_download(REPO, "dev.txt", revision="dev")).read_bytes() == b"dev only"
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "dev.txt", revision="main")
    dev_head = api.list_repo_commits(REPO, revision="dev")[0].commit_id
    api.create_tag(REPO, tag="v1", revision="dev", exist_ok=True)
    assert Path(hf_hub_download(REPO, "dev.txt", revision="v1")).read_bytes() == b"dev only"
    assert Path(hf_hub_download(REPO, "dev.txt", revision=dev_head)).read_bytes() == b"dev only"
    refs = api.list_repo_refs(REPO)
    assert {t.name: t.target_commit for t in refs.tags}["v1"] == dev_head
    assert "dev" in {b.name for b in refs.branches}


def test_pull_request_and_delete(api: HfApi) -> None:
    repo = "org/edits"
    api.create_repo(repo, exist_ok=True)
    api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id=repo)
    pr = api.upload_file(path_or_fileobj=b"v2", path_in_repo="a.txt", repo_id=repo, create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    assert Path(hf_hub_download(repo, "a.txt", revision="refs/pr/1")).read_bytes() == b"v2"
    assert Path(hf_hub_download(repo, "a.txt")).read_bytes() == b"v1"
    api.delete_file("a.txt", repo_id=repo)
    assert not api.file_exists(repo, "a.txt")
    with pytest.raises(EntryNotFoundError):
        api.delete_file("a.txt", repo_id=repo)


def test_multipart_lfs_upload(api: HfApi, hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_server, "multipart_threshold", 100_000)
    monkeypatch.setattr(hub_server, "multipart_chunk_size", 64_000)
    parts: list[str] = []
    put_part = HubRequestHandler.h_lfs_put_part
    monkeypatch.setattr(
        HubRequestHandler,
        "h_lfs_put_part",
        lambda self, oid, part: parts.append(part) or put_part(self, oid, part),
    )
    data = os.urandom(150_000)  # 3 parts
    api.create_repo("org/multipart", exist_ok=True)
    api.upload_file(path_or_fileobj=data, path_in_repo="weights.bin", repo_id="org/multipart")
    assert Path(hf_hub_download("org/multipart", "weights.bin")).read_bytes() == data
    assert sorted(parts) == ["1", "2", "3"]


def test_dataset_repo(api: HfApi) -> None:
    api.create_repo("org/data", repo_type="dataset", exist_ok=True)
    api.upload_file(
        path_or_fileobj=b"a,b\n1,2\n", path_in_repo="train.csv", repo_id="org/data", repo_type="dataset"
    )
    path = hf_hub_download("org/data", "train.csv", repo_type="dataset")
    assert Path(path).read_bytes() == b"a,b\n1,2\n"
    assert api.dataset_info("org/data").siblings[-1].rfilename == "train.csv"
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/data")


def test_errors(demo: Path) -> None:
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "does-not-exist.txt")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/no-such-repo", "notes.txt")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "notes.txt", revision="no-such-branch")


def test_subprocess_inherits_hub_environment(demo: Path) -> None:
    code = "from huggingface_hub import hf_hub_download as d; print(open(d('org/demo', 'notes.txt')).read())"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout == "hello hub\n\n"


def test_range_request(hub_server: HubServer, demo: Path) -> None:
    response = get_session().get(
        f"{hub_server.url}/{REPO}/resolve/main/notes.txt", headers={"Range": "bytes=6-"}
    )
    assert response.status_code == 206
    assert response.content == b"hub\n"


def test_state_is_persisted(hub_server: HubServer, demo: Path) -> None:
    reloaded = HubServer(hub_server.store.root)
    assert "model:org/demo" in reloaded.store.repos


def test_transformers_push_and_load(hub_server: HubServer) -> None:
    import torch
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    model = BertModel(config)
    model.push_to_hub("org/tiny-bert")
    loaded = AutoModel.from_pretrained("org/tiny-bert")
    assert isinstance(loaded, BertModel)
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name
