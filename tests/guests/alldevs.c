/*
 * alldevs: one guest that drives every storage and entropy device of a VM
 * in turn -- all virtio-blk disks, every AHCI HBA (SATA disks and ATAPI
 * CD-ROMs), and virtio-rnd -- so one VM holding several devices of each
 * type is exercised by one boot.  It reuses the single-device guests'
 * code unchanged: each is included with its entry point (and its one
 * clashing helper name) renamed.  Output is the concatenation of theirs,
 * then "ALLDEVS DONE".
 */
#define guest_main alldevs_virtio_blk
#define test_disk vblk_test_disk
#include "virtio_blk.c"
#undef TAG
#undef test_disk
#undef guest_main

#define guest_main alldevs_ahci
#define test_disk ahci_test_disk
#include "ahci.c"
#undef TAG
#undef test_disk
#undef guest_main

#define guest_main alldevs_virtio_rnd
#include "virtio_rnd.c"
#undef guest_main

void guest_main(void)
{
	alldevs_virtio_blk();
	alldevs_ahci();
	alldevs_virtio_rnd();
	kprintf("ALLDEVS DONE\n");
}
