"""The live progress view."""


def test_progress_prints_lines_without_a_terminal():
    """In a log file or batch job the live bar shows nothing until the end: one line per finished unit instead."""
    import io

    from rich.console import Console

    from lorastudy.progress import Progress

    buf = io.StringIO()
    with Progress("tune (trials)", total=3, console=Console(file=buf, force_terminal=False, width=200)) as p:
        p.advance_rows(1, "rte/lora trial 0: val acc 0.5000")
        p.finish("sst2/full/seed42", ok=False)
    text = buf.getvalue()
    assert "tune (trials): 1/3 done" in text and "rte/lora trial 0: val acc 0.5000" in text
    assert "2/3 done" in text and "sst2/full/seed42 FAILED" in text



def test_a_phase_without_counted_units_ends_shown_done():
    """drift and report count no units: their bar ended as '0/?' with an open ETA, as if nothing had run."""
    import io

    import pytest
    from rich.console import Console

    from lorastudy.progress import Progress

    buf = io.StringIO()
    with Progress("phase drift", console=Console(file=buf, force_terminal=True, width=120)) as p:
        pass
    assert "1/1" in buf.getvalue() and "0/?" not in buf.getvalue().splitlines()[-1]
    with pytest.raises(RuntimeError), Progress("phase drift", console=Console(file=io.StringIO())) as p:
        raise RuntimeError("a failing phase is not shown done")
    assert p._p.tasks[0].total is None
