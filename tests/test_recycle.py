"""The recycle hook that the GPU guard uses rides on billiard's max-memory-per-child check."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import ROOT


def test_requested_recycle_reports_over_any_limit():
    code = textwrap.dedent(
        """
        import resource
        import billiard.pool
        from glyphq.worker import recycle
        recycle.install()
        before = billiard.pool.mem_rss()
        block = bytearray(300 * 1024 * 1024)  # touch 300 MB, then let it go
        block[::4096] = b"x" * len(block[::4096])
        del block
        normal = billiard.pool.mem_rss()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert 0 < normal < 2**40, normal
        # The guard reads memory held now, not the peak: a load-time peak must not recycle every job.
        assert peak - normal > 200 * 1024, (before, normal, peak)
        assert recycle.requested() is None
        recycle.request("gpu", "test")
        assert billiard.pool.mem_rss() > 2**60
        assert recycle.requested() == "gpu"
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
