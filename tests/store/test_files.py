import threading

import pytest

from part_distillation.store.files import atomic_open, atomic_write_bytes, atomic_write_text


def test_concurrent_writers_of_one_file_never_mix(tmp_path):
    """Several shards may write the same merged file at once: each reader sees one whole version."""
    path = tmp_path / "metrics.md"
    versions = [bytes([65 + i]) * (1 << 17) + b"\n" for i in range(4)]
    atomic_write_bytes(path, versions[0])
    errors, seen, stop = [], set(), threading.Event()

    def write(data):
        try:
            for _ in range(40):
                atomic_write_bytes(path, data)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    def read():
        while not stop.is_set():
            seen.add(path.read_bytes())

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(v,)) for v in versions]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert not errors
    assert seen <= set(versions) and seen
    assert path.read_bytes() in versions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.md"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_files_are_readable_by_the_group(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o044  # not mkstemp's 0600 (umask permitting)
