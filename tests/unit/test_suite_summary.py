"""The suite's closing summary of the engines it prepared: per variant, where a build's time went."""

from sdxl_core.suite.summary import engine_lines


def test_each_built_engine_shows_its_phases_largest_first():
    records = [
        {"variant": "xl-1.0-fp16", "mode": "loaded", "worker": "gw1", "seconds": 18.8, "phases": {"engine_load": 12.0}},
        {
            "variant": "xl-1.0-int8",
            "mode": "built",
            "worker": "this process",
            "seconds": 264.7,
            "phases": {"calibration": 40.2, "gemm_dispatch": 95.1, "compile": 61.0, "convert": 0.2},
        },
    ]
    lines = engine_lines(records)
    assert lines[0].startswith("xl-1.0-fp16") and "loaded" in lines[0] and "18.8 s" in lines[0]
    assert lines[1].split() == ["phases:", "engine_load", "12.0", "s"]
    assert lines[2].startswith("xl-1.0-int8") and "built" in lines[2]
    # largest first; phases under half a second are left out
    assert lines[3].split("phases: ")[1] == "gemm_dispatch 95.1 s, compile 61.0 s, calibration 40.2 s"
    assert lines[-1] == "building took 264.7 s of this run"


def test_records_without_phases_still_print():
    lines = engine_lines([{"variant": "xl-turbo", "mode": "loaded", "worker": "gw0", "seconds": 3.0}])
    assert lines == [f"{'xl-turbo':<18} {'loaded':<10} on {'gw0':<13} 3.0 s"]
