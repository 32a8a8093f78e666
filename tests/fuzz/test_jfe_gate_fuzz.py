"""Property: any SNI string either normalises to an LDH name that the gate can key budgets,
files and ACME orders on, or is refused as a value; the gate never raises on a name."""

from __future__ import annotations

import ipaddress
import re

from hypothesis import given
from hypothesis import strategies as st

from jfe.gate import Admitted, AllowList, Budget, Gate, Reason, normalize_name

LDH = re.compile(r"^[a-z0-9-]{1,63}(\.[a-z0-9-]{1,63})+$")
names = st.one_of(
    st.text(max_size=300),
    st.from_regex(r"\A[a-zA-Z0-9._*-]{0,80}\Z"),
    st.lists(st.from_regex(r"\A[a-z0-9-]{1,12}\Z"), min_size=1, max_size=5).map(".".join),
)


@given(names)
def test_normalised_names_are_safe_to_use_as_keys_and_file_names(raw: str) -> None:
    name = normalize_name(raw)
    if name is not None:
        assert LDH.match(name) and len(name) <= 253
        assert "/" not in name and ".." not in name and not name.startswith(".")
        assert normalize_name(name) == name


@given(names, st.integers(min_value=0, max_value=2**32 - 1))
def test_the_gate_answers_every_name_with_a_value(raw: str, addr: int) -> None:
    gate = Gate(
        AllowList(["*.example.com"]),
        client_budget=Budget(2, 0.0),
        domain_budget=Budget(2, 0.0),
        total_budget=Budget(2, 0.0),
        has_other_checks=True,
    )
    result = gate.screen(raw, ipaddress.IPv4Address(addr), now=0.0)
    assert isinstance(result, Admitted | Reason)
    if isinstance(result, Admitted):
        assert result.name.endswith(".example.com") and result.domain == "example.com"
