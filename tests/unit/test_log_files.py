"""server/log_files.py: the metrics files are written on the caller's thread; their rotation
renames on the caller's thread and shifts/gzips the backups on the writer thread, in order."""

from __future__ import annotations

import gzip

from server.log_files import LogFiles


def test_metrics_files_are_written_before_write_now_returns_and_rotate_into_gzipped_backups(tmp_path):
    files = LogFiles(str(tmp_path / "logs"), str(tmp_path / "metrics"), max_bytes=100, backups=2,
                     server_logs=False, metrics_logs=True)
    path = tmp_path / "metrics" / "ts_metrics.log"
    lines = [f"line {i:02d} " + "x" * 40 + "\n" for i in range(7)]  # 49 bytes: two per file
    try:
        files.write_now("ts_metrics", lines[0])
        assert path.read_text() == lines[0]  # no flush, no writer thread needed
        for line in lines[1:]:
            files.write_now("ts_metrics", line)
    finally:
        files.close()  # waits for the writer thread's rotations
    assert path.read_text() == lines[6]
    assert gzip.decompress((tmp_path / "metrics" / "ts_metrics.log.1.gz").read_bytes()).decode() == "".join(lines[4:6])
    assert gzip.decompress((tmp_path / "metrics" / "ts_metrics.log.2.gz").read_bytes()).decode() == "".join(lines[2:4])
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == [
        "model_metrics.log", "ts_metrics.log", "ts_metrics.log.1.gz", "ts_metrics.log.2.gz"]
