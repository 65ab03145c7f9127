"""Data sets and partitions: sizes add up, skew follows alpha, same seed same split, clear file errors."""

import numpy as np
import pytest

from fl_app.config.settings import Settings
from fl_app.task.data import (
    DataFileError,
    client_data,
    federated_data,
    hf_dataset_to_arrays,
    load_local_file,
    partition_indices,
)


def labels(n=2000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shards"])
def test_partitions_cover_every_example_once(partitioner):
    y = labels()
    parts = partition_indices(y, 10, partitioner, alpha=0.5, shards_per_client=2, seed=1)
    assert len(parts) == 10
    joined = np.concatenate(parts)
    if partitioner == "shards":  # ShardPartitioner may drop an incomplete last shard
        assert len(joined) >= len(y) - 2 * 10
    else:
        assert len(joined) == len(y)
    assert len(np.unique(joined)) == len(joined)
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shards"])
def test_same_seed_same_partitions(partitioner):
    y = labels()
    a = partition_indices(y, 8, partitioner, alpha=0.3, seed=7)
    b = partition_indices(y, 8, partitioner, alpha=0.3, seed=7)
    c = partition_indices(y, 8, partitioner, alpha=0.3, seed=8)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def label_skew(y, parts, classes=10):
    """Mean total-variation distance between each client's label histogram and the global one."""
    overall = np.bincount(y, minlength=classes) / len(y)
    tv = [0.5 * np.abs(np.bincount(y[p], minlength=classes) / len(p) - overall).sum() for p in parts]
    return float(np.mean(tv))


def test_label_skew_grows_as_alpha_falls():
    y = labels(5000)
    skews = [
        np.mean([label_skew(y, partition_indices(y, 10, "dirichlet", alpha=a, seed=s)) for s in range(3)])
        for a in (100.0, 1.0, 0.1)
    ]
    assert skews[0] < skews[1] < skews[2], skews
    iid = label_skew(y, partition_indices(y, 10, "iid", seed=0))
    shards = label_skew(y, partition_indices(y, 10, "shards", shards_per_client=2, seed=0))
    assert iid < 0.1 < 0.5 < shards  # pathological shards: about 2 classes per client


def test_digits_federation_and_client_split():
    settings = Settings(num_partitions=5, test_fraction=0.25, server_test_fraction=0.2)
    data = federated_data(settings)
    assert data.input_shape == (8, 8, 1) and data.num_classes == 10
    assert sum(len(p) for p in data.partitions) == len(data.y)
    assert abs(len(data.y_server_test) - 0.2 * 1797) <= 10
    assert set(np.unique(data.y_server_test)) == set(range(10))  # stratified
    client = client_data(settings, 2)
    assert len(client.y_train) + len(client.y_test) == len(data.partitions[2])
    assert abs(len(client.y_test) - 0.25 * len(data.partitions[2])) <= 1
    again = client_data(settings, 2)
    assert np.array_equal(client.x_train, again.x_train)
    with pytest.raises(ValueError, match="partition-id 5 is outside"):
        client_data(settings, 5)


def test_synthetic_is_learnable_and_sized():
    settings = Settings(
        dataset="synthetic",
        num_partitions=4,
        synthetic_samples_per_client=50,
        synthetic_features=6,
        synthetic_classes=3,
        partitioner="iid",
    )
    data = federated_data(settings)
    assert data.input_shape == (6,) and data.num_classes == 3
    assert sum(len(p) for p in data.partitions) == len(data.y) >= 200


def test_local_npz_and_csv(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    y = np.arange(20) % 3
    np.savez(tmp_path / "a.npz", x=x, y=y)
    xa, ya = load_local_file(tmp_path / "a.npz")
    assert np.allclose(xa, x) and np.array_equal(ya, y)
    table = np.column_stack([x, y])
    np.savetxt(
        tmp_path / "a.csv", table, delimiter=",", header="f0,f1,label,f3,f4"[:0] + "f0,f1,f2,f3,label", comments=""
    )
    xc, yc = load_local_file(tmp_path / "a.csv", "label")
    assert xc.shape == (20, 4) and np.array_equal(yc, y)


@pytest.mark.parametrize(
    ("writer", "fragment"),
    [
        (lambda p: np.savez(p.with_suffix(".npz"), x=np.zeros((3, 2))), "lacks array(s) y"),
        (lambda p: np.savez(p.with_suffix(".npz"), x=np.zeros((0, 2)), y=np.zeros(0)), "holds no examples"),
        (lambda p: np.savez(p.with_suffix(".npz"), x=np.zeros((3, 2)), y=np.zeros(2)), "x has 3 rows but y has 2"),
        (
            lambda p: np.savez(p.with_suffix(".npz"), x=np.zeros((2, 2)), y=np.array([0.5, np.nan])),
            "targets y must be finite numbers",
        ),
        (lambda p: np.savez(p.with_suffix(".npz"), x=np.array([["a", "b"]]), y=np.array([0])), "x must be numeric"),
        (lambda p: p.with_suffix(".npz").write_bytes(b"not a zip file"), "is not a valid .npz archive (corrupt"),
        (lambda p: p.with_suffix(".csv").write_text("a,b\n1,2\n"), "has no column 'label'"),
        (lambda p: p.with_suffix(".csv").write_text("a,label\n1,x\n"), "has a value that is not a number"),
    ],
)
def test_bad_local_file_says_why(tmp_path, writer, fragment):
    base = tmp_path / "node"
    writer(base)
    path = next(tmp_path.iterdir())
    with pytest.raises(DataFileError, match=None) as err:
        load_local_file(path)
    assert fragment in str(err.value)


def test_local_file_label_range_checked(tmp_path):
    np.savez(tmp_path / "n0.npz", x=np.zeros((5, 4)), y=np.array([0, 1, 2, 3, 9]))
    settings = Settings(
        dataset="local-file", data_path=str(tmp_path / "n{partition-id}.npz"), num_classes=4, input_shape="4"
    )
    with pytest.raises(DataFileError, match=r"label 9 is outside \[0, 4\) \(num-classes\)"):
        client_data(settings, 0)


def test_huggingface_dataset_to_arrays():
    from datasets import Dataset

    images = np.random.default_rng(0).integers(0, 256, size=(12, 5, 5)).astype(np.uint8)
    ds = Dataset.from_dict({"image": list(images), "label": list(np.arange(12) % 4)})
    x, y = hf_dataset_to_arrays(ds, "label")
    assert x.shape == (12, 5, 5, 1) and x.max() <= 1.0 and np.array_equal(y, np.arange(12) % 4)
    tabular = Dataset.from_dict({"a": [1.0, 2.0], "b": [3.0, 4.0], "y": [0, 1]})
    x, y = hf_dataset_to_arrays(tabular, "y")
    assert x.shape == (2, 2)
    with pytest.raises(DataFileError, match="hf-label-column 'label' is not a column"):
        hf_dataset_to_arrays(tabular, "label")


SECRET = "AKIA-SECRET-TOKEN"


@pytest.mark.parametrize(
    "content",
    [
        f"user,{SECRET}\n1,2\n",  # the header (a secrets file's first line) lacks the label column
        f"a,label\n1,{SECRET}\n",  # a value that is not a number
        f"a,label\n1,2,{SECRET}\n",  # a row of another length
    ],
)
def test_errors_never_quote_the_file(tmp_path, content):
    path = tmp_path / "secrets.csv"
    path.write_text(content)
    with pytest.raises(DataFileError) as err:
        load_local_file(path)
    assert SECRET not in str(err.value) and "secrets.csv" in str(err.value)


def test_an_npz_is_checked_for_its_uncompressed_size_before_loading(tmp_path, monkeypatch):
    import tracemalloc

    import fl_app.task.data as data_module

    monkeypatch.setattr(data_module, "DATA_FILE_MAX_BYTES", 2**22)  # 4 MiB, as 1 GiB is to a device
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x=np.zeros(2**21, np.float32), y=np.zeros(1))  # 8 MiB of zeros
    assert path.stat().st_size < 2**16  # a 1000x expansion
    tracemalloc.start()
    with pytest.raises(DataFileError, match=r"expands to 8,388,\d{3} bytes, over 4,194,304"):
        load_local_file(path)
    assert tracemalloc.get_traced_memory()[1] < 2**21  # refused before anything was decompressed
    tracemalloc.stop()


def test_a_pickled_npz_gets_a_corruption_message_not_numpys_pickle_advice(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(DataFileError, match="corrupt or non-numeric array") as err:
        load_local_file(path)
    assert "allow_pickle" not in str(err.value)


def test_a_node_reads_the_servers_data_path_only_inside_its_data_root(tmp_path):
    from fl_app.task.data import node_data_path

    inside = tmp_path / "data" / "n1.npz"
    settings = Settings(dataset="local-file", data_path=str(tmp_path / "data" / "n{partition-id}.npz"))
    assert node_data_path(settings, {"data-root": str(tmp_path / "data")}, 1) == str(inside)
    assert node_data_path(settings, {"data-path": "/own/file.npz"}, 1) == "/own/file.npz"  # the node's own
    assert node_data_path(settings, {"partition-id": 1, "num-partitions": 4}, 1) == str(inside)  # simulation
    escaping = Settings(dataset="local-file", data_path=str(tmp_path / "data" / ".." / "etc.csv"))
    with pytest.raises(DataFileError, match="is outside this node's data-root"):
        node_data_path(escaping, {"data-root": str(tmp_path / "data")}, 1)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "link.csv").symlink_to(tmp_path / "outside.csv")
    linked = Settings(dataset="local-file", data_path=str(tmp_path / "data" / "link.csv"))
    with pytest.raises(DataFileError, match="is outside this node's data-root"):
        node_data_path(linked, {"data-root": str(tmp_path / "data")}, 1)
    with pytest.raises(DataFileError, match="reads the server's paths only inside its own data-root"):
        node_data_path(settings, {"partition-id": 1}, 1)
