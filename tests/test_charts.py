"""Pipeline charts: boxes from the simulator, the PNG, and `plait schedule`."""

from __future__ import annotations

from collections import Counter

import pytest

from plait.charts import Box, boxes_from_simulation, draw_pipeline
from plait.cli import main
from plait.parallel.schedule import make_schedule, simulate

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def simulated(name, pp, m, virtual=1):
    return simulate(make_schedule(name, pp, m, virtual), pp, m, virtual)


def read_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return matplotlib.image.imread(path)


@pytest.mark.parametrize("name,pp,m,virtual", [("1f1b", 4, 8, 1), ("interleaved-1f1b", 2, 4, 3)])
def test_one_box_per_action_at_the_simulated_times(name, pp, m, virtual):
    sim = simulated(name, pp, m, virtual)
    boxes = boxes_from_simulation(sim, virtual)
    expected = {(r, s, e, a.kind, a.stage, a.microbatch) for r, acts in sim.timeline.items() for s, e, a in acts}
    seen = Counter()
    for b in boxes:
        stage, micro = (map(int, b.label.split(":")) if virtual > 1 else (b.rank, int(b.label)))
        assert (b.rank, b.start, b.end, b.kind, stage, micro) in expected
        assert b.chunk == stage // pp
        seen[(stage, micro, b.kind)] += 1
    wanted = {(s, i, k) for s in range(pp * virtual) for i in range(m) for k in "FB"}
    assert set(seen) == wanted and set(seen.values()) == {1}


def test_draw_pipeline_writes_a_png_that_depends_on_the_schedule(tmp_path):
    one = tmp_path / "1f1b.png"
    gpipe = tmp_path / "gpipe.png"
    draw_pipeline([("simulated", boxes_from_simulation(simulated("1f1b", 4, 8)), "units")], one, "1f1b", 4)
    draw_pipeline([("simulated", boxes_from_simulation(simulated("gpipe", 4, 8)))], gpipe, "gpipe", 4)
    a, b = read_png(one), read_png(gpipe)
    height, width = a.shape[:2]
    assert a.shape == b.shape and 800 <= width <= 1600 and 200 <= height < width
    assert a.std() > 0.05  # not one flat colour
    assert (abs(a - b) > 0.1).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1f1b.png", "gpipe.png"]  # no temporary left


def test_two_panels_of_measured_and_other_kinds(tmp_path):
    measured = [Box(0, 0.000, 0.004, "F", "0"), Box(1, 0.004, 0.008, "F", "0"), Box(1, 0.009, 0.017, "B", "0"),
                Box(0, 0.018, 0.026, "B", "0"), Box(0, 0.004, 0.018, "wait"), Box(1, 0.008, 0.009, "send"),
                Box(0, 0.026, 0.030, "allreduce"), Box(1, 0.026, 0.030, "allreduce"),
                Box(0, 0.030, 0.031, "optimizer"), Box(1, 0.030, 0.031, "zero-grad")]
    single = tmp_path / "single.png"
    double = tmp_path / "double.png"
    sim = boxes_from_simulation(simulated("1f1b", 2, 1))
    draw_pipeline([("simulated", sim, "units")], single, "one panel", 2)
    draw_pipeline([("measured", measured, "s"), ("simulated", sim, "units")], double, "two panels", 2)
    assert read_png(double).shape[0] > read_png(single).shape[0]  # taller with a second panel
    with pytest.raises(ValueError, match="unknown unit"):
        draw_pipeline([("measured", measured, "hours")], tmp_path / "x.png", "bad", 2)


def test_plait_schedule_prints_the_grid_and_bubbles_and_draws(tmp_path, capsys):
    out = tmp_path / "chart.png"
    assert main(["schedule", "1f1b", "--stages", "4", "--microbatches", "8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rank 0 | 0F0 0F1 0F2 0F3 0B0 0F4" in text
    assert "rank 3 | 3F0 3B0 3F1 3B1" in text
    assert "makespan            33" in text
    assert "bubble (simulated)  0.2727" in text  # 1 - 24/33 = 3/11
    assert "bubble (theory)     0.2727" in text
    assert "in flight per rank (forwards awaiting their backward): 4 3 2 1" in text
    assert read_png(out).ndim == 3


def test_plait_schedule_zb1p_prints_i_and_w_and_draws_them(tmp_path, capsys):
    out = tmp_path / "chart.png"
    assert main(["schedule", "zb1p", "--stages", "4", "--microbatches", "8", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:9] == [
        "zb1p: 4 stages, 8 micro-batches (per rank: forward 1, input 1, weight 1; comm 0)",
        "rank 0 | 0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0F6 0B3 0F7 0B4 0B5 0B6 0B7",  # nobody waits for stage 0's I
        "rank 1 | 1F0 1F1 1F2 1I0 1F3 1I1 1W0 1F4 1I2 1W1 1F5 1I3 1W2 1F6 1I4 1W3 1F7 1I5 1W4 1I6 1W5 1I7 1W6 1W7",
        "rank 2 | 2F0 2F1 2I0 2F2 2I1 2F3 2I2 2W0 2F4 2I3 2W1 2F5 2I4 2W2 2F6 2I5 2W3 2F7 2I6 2W4 2I7 2W5 2W6 2W7",
        "rank 3 | 3F0 3I0 3F1 3I1 3F2 3I2 3F3 3I3 3W0 3F4 3I4 3W1 3F5 3I5 3W2 3F6 3I6 3W3 3F7 3I7 3W4 3W5 3W6 3W7",
        "makespan            27",  # 3m + pp - 1: 1f1b's 33 less two thirds of its 3 x 3 idle units
        "bubble (simulated)  0.1111",  # 3/27
        "bubble (theory)     0.1111",
        "peak micro-batches in flight per rank (forwards awaiting their weight gradients): 4 4 4 4",
    ]
    assert lines[9] == f"wrote {out}"
    image = read_png(out)[..., :3]

    def has(colour):  # some pixel within 2% of `colour` on each channel
        from matplotlib.colors import to_rgb

        return bool((abs(image - to_rgb(colour)).max(axis=-1) < 0.02).any())

    # I in orange and W in yellow, besides the forwards' blue, and stage 0's whole B in vermillion.
    assert [has(c) for c in ("#0072B2", "#E69F00", "#F0E442", "#D55E00")] == [True, True, True, True]
    out.unlink()
    assert main(["schedule", "1f1b", "--stages", "4", "--microbatches", "8", "--out", str(out)]) == 0
    image = read_png(out)[..., :3]
    assert [has(c) for c in ("#0072B2", "#E69F00", "#F0E442", "#D55E00")] == [True, False, False, True]


def test_plait_schedule_zbv_defaults_to_two_virtual_stages_and_takes_i_and_w_costs(capsys):
    assert main(["schedule", "zbv", "--stages", "2", "--microbatches", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("zbv: 2 stages x 2 virtual in a V, 4 micro-batches "
                        "(per rank: forward 1, input 1, weight 1; comm 0)")
    assert lines[3:6] == ["makespan            12.5", "bubble (simulated)  0.0400", "bubble (theory)     0.0400"]
    # I = 2, W = 1 (per rank): the gradient path is longer, and the W's cannot cover all of it.
    assert main(["schedule", "zb1p", "--stages", "2", "--microbatches", "2", "--input-cost", "2",
                 "--weight-cost", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "zb1p: 2 stages, 2 micro-batches (per rank: forward 1, input 2, weight 1; comm 0)"
    assert lines[3:5] == ["makespan            10", "bubble (simulated)  0.2000"]  # 1 - 16/20


def test_plait_schedule_dualpipev_prints_its_v_and_its_peak_in_micro_batches(capsys):
    assert main(["schedule", "dualpipev", "--stages", "2", "--microbatches", "4"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "dualpipev: 2 stages x 2 virtual in a V, 4 micro-batches (per rank: forward 1, input 1, weight 1; comm 0)",
        "rank 0 | 0F0 0F1 0F2 3F0 3I0 3W0 3F1 0F3 3B1 3F2 0B0 3B2 3F3 0B1 3B3 0B2 0B3",
        "rank 1 | 1F0 2F0 1F1 2F1 1F2 2B0 2F2 1B0 1F3 2B1 2F3 1B1 2B2 1B2 2I3 1I3 2W3 1W3",
        "makespan            12.5",  # (6m + pp - 1) chunk actions of half a rank's cost each
        "bubble (simulated)  0.0400",
        "bubble (theory)     0.0400",
        # 5 of a rank's two stages at once, each half of its layers; interleaved 1F1B and zbv count alike.
        "peak micro-batches in flight per rank (forwards awaiting their weight gradients; each of a rank's 2 "
        "stages counts 1/2): 2.5 2.5",
    ]
    assert main(["schedule", "dualpipev", "--stages", "2", "--microbatches", "3"]) == 2
    assert capsys.readouterr().err == ("plait: error: dualpipev needs at least 2 x --stages = 4 --microbatches "
                                       "(got 3); use 4 or more, or zbv for fewer\n")


def test_zero_bubble_boxes_carry_i_and_w():
    sim = simulate(make_schedule("zbv", 2, 4, 2), 2, 4, 2, layout="v")
    boxes = boxes_from_simulation(sim, 2)
    assert Counter(b.kind for b in boxes) == {"F": 16, "B": 4, "I": 12, "W": 12}  # stage 0: whole B's
    assert {(b.rank, b.label, b.chunk) for b in boxes if b.kind in "BW" and b.label.endswith(":0")} == {
        (0, "0:0", 0), (0, "3:0", 1), (1, "1:0", 0), (1, "2:0", 1)}


def test_plait_schedule_interleaved_costs_are_per_rank(capsys):
    # The same work as 1f1b, split over two chunks per rank: a smaller bubble, a shorter step.
    assert main(["schedule", "interleaved-1f1b", "--stages", "4", "--microbatches", "8", "--virtual-stages", "2"]) == 0
    text = capsys.readouterr().out
    assert "makespan            28.5" in text
    assert "bubble (simulated)  0.1579" in text  # 3/19
    assert main(["schedule", "interleaved-1f1b", "--stages", "4", "--microbatches", "8", "--virtual", "2"]) == 0
    assert capsys.readouterr().out == text  # the older spelling, still taken


def test_plait_schedule_names_virtual_stages_as_plait_train_does(capsys):
    with pytest.raises(SystemExit):
        main(["schedule", "--help"])
    out = capsys.readouterr().out
    assert "--virtual-stages V" in out and "--virtual " not in out


def test_plait_schedule_replaces_an_existing_chart_only_with_force(tmp_path, capsys):
    out = tmp_path / "x.png"
    out.write_text("mine")
    args = ["schedule", "1f1b", "--stages", "2", "--microbatches", "2", "--out", str(out)]
    assert main(args) == 2
    assert capsys.readouterr() == ("", f"plait: error: --out {out} exists; give --force to replace it, "
                                       f"or a new file name\n")
    assert out.read_text() == "mine"
    assert main([*args, "--force"]) == 0
    assert read_png(out).ndim == 3


@pytest.mark.parametrize("args,message", [
    # Issue 15 item 14: each message names this command's own options.
    (["interleaved-1f1b", "--stages", "4", "--microbatches", "6", "--virtual-stages", "2"],
     "interleaved-1f1b needs --microbatches (6) to be a multiple of --stages (4); use 4 or 8"),
    (["1f1b", "--stages", "4", "--microbatches", "8", "--virtual-stages", "2"],
     "1f1b runs one stage per rank, so --virtual-stages must be 1 (got 2); use interleaved-1f1b for "
     "--virtual-stages > 1"),
    (["interleaved-1f1b", "--stages", "2", "--microbatches", "2"],
     "interleaved-1f1b needs --virtual-stages >= 2 (got 1); use 1f1b for one stage per rank"),
    (["zigzag", "--stages", "2", "--microbatches", "2"],
     "unknown schedule 'zigzag'; choose one of gpipe, 1f1b, interleaved-1f1b, zb1p, zbv, dualpipev, forward-only"),
    (["1f1b", "--stages", "0", "--microbatches", "2"], "--stages must be >= 1 (got 0)"),
    (["1f1b", "--stages", "2", "--microbatches", "0"], "--microbatches must be >= 1 (got 0)"),
    (["1f1b", "--stages", "2", "--microbatches", "2", "--virtual-stages", "0"], "--virtual-stages must be >= 1 (got 0)"),
    (["1f1b", "--stages", "2", "--microbatches", "2", "--forward-cost", "0"], "--forward-cost must be a finite number > 0 (got 0)"),
    (["1f1b", "--stages", "2", "--microbatches", "2", "--backward-cost", "inf"],
     "--backward-cost must be a finite number > 0 (got inf)"),
    (["1f1b", "--stages", "2", "--microbatches", "2", "--comm-cost", "nan"], "--comm-cost must be a finite number >= 0 (got nan)"),
    (["1f1b", "--stages", "2"], "the following arguments are required: --microbatches; see 'plait schedule --help'"),
    (["zbv", "--stages", "4", "--microbatches", "8", "--virtual-stages", "3"],
     "zbv runs two stages per rank in a V, so --virtual-stages must be 2 (got 3); use --virtual-stages 2, or zb1p "
     "for one stage per rank"),
    (["zb1p", "--stages", "4", "--microbatches", "8", "--virtual-stages", "2"],
     "zb1p runs one stage per rank, so --virtual-stages must be 1 (got 2); use zbv for --virtual-stages = 2"),
    (["zb1p", "--stages", "2", "--microbatches", "2", "--input-cost", "-1"],
     "--input-cost must be a finite number > 0 (got -1)"),
])
def test_plait_schedule_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(["schedule", *args]) == 2
    assert capsys.readouterr() == ("", f"plait: error: {message}\n")



def test_a_chart_has_one_collection_per_row_not_an_artist_per_action(tmp_path):
    """64 stages x 512 micro-batches took over a minute when every box was a Rectangle and a label."""
    from matplotlib.patches import Rectangle

    boxes = boxes_from_simulation(simulated("1f1b", 8, 256))
    fig = draw_pipeline([("simulated", boxes, "units")], tmp_path / "big.png", "big", 8)
    [ax] = fig.axes
    assert len(boxes) == 8 * 256 * 2
    assert len(ax.collections) == 8  # one per rank
    assert not [p for p in ax.patches if isinstance(p, Rectangle)]
    # 512 boxes a row in about 1100 pixels: no label fits, and none is made; nor white edges, wider than the boxes.
    assert [t.get_text() for t in ax.texts] == []
    assert {float(w) for c in ax.collections for w in c.get_linewidths()} == {0.0}


def test_labels_are_drawn_where_they_fit(tmp_path):
    boxes = boxes_from_simulation(simulated("1f1b", 4, 8))
    fig = draw_pipeline([("simulated", boxes, "units")], tmp_path / "small.png", "small", 4)
    [ax] = fig.axes
    assert sorted(t.get_text() for t in ax.texts) == sorted(b.label for b in boxes)
    assert len(ax.collections) == 4
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0", "rank 1", "rank 2", "rank 3"]


def test_interleaved_labels_fall_back_to_micro_batches_for_the_whole_panel(tmp_path):
    # 32 micro-batches x 2 chunks: "stage:micro-batch" no longer fits in a forward box.
    boxes = boxes_from_simulation(simulated("interleaved-1f1b", 2, 16, 2), virtual=2)
    fig = draw_pipeline([("simulated", boxes, "units")], tmp_path / "i.png", "interleaved", 2)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts and not any(":" in t for t in texts)


def traced_events(dp, pp, m=2):
    """A step of 1f1b as a traced run records it: every replica's ranks, global rank = pp_rank * dp + dp_rank."""
    from plait.trace import Event

    sim = simulated("1f1b", pp, m)
    return [Event(pp_rank * dp + dp_rank, 0, a.kind, f"{a.kind}{a.microbatch}", start * 1e-3, end * 1e-3,
                  a.stage, a.microbatch)
            for pp_rank, acts in sim.timeline.items() for dp_rank in range(dp) for start, end, a in acts]


@pytest.mark.parametrize("dp,pp,title,labels", [
    (2, 2, "measured: step 1, replica 0 (ranks 0, 2)", ["rank 0 (dp=0, pp=0)", "rank 2 (dp=0, pp=1)"]),
    (2, 1, "measured: step 1, all 2 replicas", ["rank 0 (dp=0, pp=0)", "rank 1 (dp=1, pp=0)"]),
    (1, 2, "measured: step 1", ["rank 0 (dp=0, pp=0)", "rank 1 (dp=0, pp=1)"]),
], ids=["dp=2 x pp=2", "dp=2 x pp=1", "dp=1 x pp=2"])
def test_pipeline_chart_rows_carry_the_job_s_rank_numbers(tmp_path, monkeypatch, dp, pp, title, labels):
    """The rows say what the `ranks:` line and trace.json say: at dp=2 x pp=2 replica 0's second stage is rank 2."""
    import plait.charts
    from plait.trace import write_outputs

    calls = []
    draw = plait.charts.draw_pipeline
    monkeypatch.setattr(plait.charts, "draw_pipeline",
                        lambda panels, out, title, **kw: calls.append((panels, title, kw)) or draw(panels, out, title,
                                                                                                     **kw))
    write_outputs(traced_events(dp, pp), tmp_path, "1f1b", dp, pp, 2, 1, {})
    [(panels, _, kw)] = calls
    assert panels[0][0] == title
    assert kw["row_labels"] == labels and kw["num_ranks"] == len(labels)
    fig_labels = [t.get_text() for t in draw(panels, tmp_path / "again.png", "t", **kw).axes[0].get_yticklabels()]
    assert fig_labels == labels
    assert (tmp_path / "pipeline.png").is_file()
