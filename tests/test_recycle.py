"""The recycle hook that the GPU guard uses rides on billiard's max-memory-per-child check."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import ROOT


def test_requested_recycle_reports_over_any_limit():
    code = textwrap.dedent(
        """
        import billiard.pool
        from worker import recycle
        recycle.install()
        normal = billiard.pool.mem_rss()
        assert 0 < normal < 2**40, normal
        assert recycle.requested() is None
        recycle.request("test")
        assert billiard.pool.mem_rss() > 2**60
        assert recycle.requested() == "test"
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_billiard_still_checks_memory_through_mem_rss():
    """If billiard stops calling ``mem_rss`` after each task, the GPU guard silently stops working."""
    import inspect

    import billiard.pool

    source = inspect.getsource(billiard.pool.Worker.workloop)
    assert "mem_rss()" in source and "EX_RECYCLE" in source
