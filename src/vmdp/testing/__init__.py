"""Support for the demo, the tests and the benchmarks: throwaway QEMU VMs on real KVM or TCG."""
