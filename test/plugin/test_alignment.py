"""FP8 block alignment, with intermediate sizes where the operand order of the arithmetic matters.

SGLang's check: ``(moe_intermediate_size / moe_tp_size) % weight_block_size_n == 0`` (and the division
exact).  Qwen3-235B's 1536 at TP8 gives 192, misaligned whichever way round the modulo is taken, so it
cannot tell ``per_rank % 128`` from ``128 % per_rank``; the sizes below can.  Each expected verdict is
worked out by hand in its row, from the raw numbers only.
"""

import json
from pathlib import Path

import pytest

from pytest_moe import cli

QWEN_FP8 = Path(__file__).parent / "data" / "configs" / "qwen3-235b-a22b-instruct-2507-fp8.json"


@pytest.mark.parametrize("inter, tp, ep, aligned", [
    (1536, 8, 1, False),  # 1536 / 8 = 192; 192 = 128 + 64                     -> misaligned (seed 000)
    (1536, 4, 1, True),   # 1536 / 4 = 384 = 3 x 128                          -> aligned (128 % 384 = 128 would say no)
    (2048, 8, 1, True),   # 2048 / 8 = 256 = 2 x 128                          -> aligned (128 % 256 = 128 would say no)
    (1536, 8, 2, True),   # moe_tp_size = 8 / 2 = 4; 1536 / 4 = 384 = 3 x 128 -> aligned
    (1600, 8, 1, False),  # 1600 / 8 = 200 = 128 + 72                         -> misaligned
    (1030, 8, 1, False),  # 1030 / 8 = 128.75: not a whole number of columns  -> misaligned (1030 // 8 = 128 would pass)
    (640, 1, 1, True),    # 640 / 1 = 640 = 5 x 128                           -> aligned (128 % 640 = 128 would say no)
], ids=["192", "384", "256", "ep2-384", "200", "fractional", "640-tp1"])
def test_fp8_block_alignment_verdicts(tmp_path, capsys, inter, tp, ep, aligned):
    config = json.loads(QWEN_FP8.read_text())
    config["moe_intermediate_size"] = inter
    model = tmp_path / "config.json"
    model.write_text(json.dumps(config))
    code = cli.main(["preflight", "--model", str(model), "--tp", str(tp), "--ep", str(ep), "--quantization", "fp8"])
    verdict = json.loads(capsys.readouterr().out)
    rules = [p["rule_id"] for p in verdict["problems"]]
    assert ("fp8-block-alignment" not in rules) == aligned, verdict
    assert code == (0 if verdict["ok"] else 1)
