"""Merge placeholder (S5-DESIGN.md): jfe-certs's ``[jfe.certificates]`` settings replace this."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CertificateSettings:
    pass
