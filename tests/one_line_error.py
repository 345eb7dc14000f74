"""The check every command's user-facing failure must pass: exit status 2 and one line on stderr."""

from __future__ import annotations

import pytest

from qvl_train.__main__ import main


def fails_in_one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``qvl-train argv``; it must exit 2 with one ``error: ...`` line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err
