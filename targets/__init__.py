"""Target drivers: the places a machine can come back (qemu, kvm, vmware, aws, openstack, pxe)."""
