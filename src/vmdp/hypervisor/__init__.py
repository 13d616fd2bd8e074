"""Connectors: the only code that speaks QMP, NBD, libvirt or WMI."""
