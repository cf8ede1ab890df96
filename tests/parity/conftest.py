"""Reference implementations are test-only oracles. Where CI sets IMAGINE_REQUIRE_ORACLES=1 a missing or
broken diffusers stops the run here with the reason, so the parity suite can never vanish into skips;
elsewhere its modules skip with the install hint (pytest.importorskip)."""

from __future__ import annotations

import os

import pytest

if os.environ.get("IMAGINE_REQUIRE_ORACLES"):
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401  (diffusers' LoRA loading)
    except ImportError as err:
        pytest.fail(f"IMAGINE_REQUIRE_ORACLES is set and the parity tests' oracles, diffusers and peft, do not "
                    f"import ({err}): pip install -e '.[test]'", pytrace=False)
