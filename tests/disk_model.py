"""A test model of a VM's disks: every write applied to the VM is applied here too."""

from __future__ import annotations

from dataclasses import dataclass, field

from vmdp.testing.vm import ThrowawayVM


@dataclass
class DiskModel:
    vm: ThrowawayVM
    data: dict[str, bytearray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = {name: bytearray(size) for name, size in self.vm.disks.items()}

    def write(self, disk: str, offset: int, length: int, pattern: int) -> None:
        self.vm.write_pattern(disk, offset, length, pattern)
        self.data[disk][offset : offset + length] = bytes([pattern]) * length

    def write_data(self, disk: str, offset: int, payload: bytes) -> None:
        self.vm.write_data(disk, offset, payload)
        self.data[disk][offset : offset + len(payload)] = payload

    def snapshot(self) -> dict[str, bytes]:
        return {name: bytes(buf) for name, buf in self.data.items()}
