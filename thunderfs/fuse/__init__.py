"""The FUSE side: the kernel's wire protocol (kernel), one connection served on trio (session),
Operations (the one errno boundary), the inode table, the state one serving process leaves the
next (state), and mounting (mounting)."""
