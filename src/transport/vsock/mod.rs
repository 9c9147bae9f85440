//! awd as QEMU's vhost-user vsock device (work in progress).
