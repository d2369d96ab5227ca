/*
 * A legacy virtio-net driver: MAC from the device configuration, receive
 * queue 0 filled with buffers (10-byte virtio_net_hdr in its own
 * descriptor, as legacy drivers without mergeable buffers do), N frames
 * sent on transmit queue 1, then every received frame of ethertype 0x88B5
 * is printed until one whose payload starts with "quit".
 * Output: README.md.
 */
#include "dma.h"
#include "guest.h"
#include "pcifw.h"
#include "virtio.h"

#define NET_F_MAC	(1u << 5)
#define NET_F_STATUS	(1u << 16)
#define NET_S_LINK_UP	1
#define NET_HDR_LEN	10	/* struct virtio_net_hdr, no mergeable bufs */
#define ETH_HLEN	14
#define ETH_ZLEN	60	/* minimum frame without FCS */
#define RX_BUF_LEN	1526	/* 1514-byte frame and a little slack */
#define RX_BUFS		16
#define TX_FRAMES	3
#define ETHERTYPE	0x88b5	/* IEEE local experimental */
#define RX_SHOW		32	/* bytes of each frame printed */
#define Q_RX		0
#define Q_TX		1

static struct virtio_dev dev;
static struct virtq rxq, txq;
static uint8_t *rx_hdr[RX_BUFS], *rx_buf[RX_BUFS];
static unsigned nbufs;
static uint8_t mac[6];

static void post_rx(unsigned i)
{
	struct virtq_seg segs[2] = {
		{ rx_hdr[i], NET_HDR_LEN, true },
		{ rx_buf[i], RX_BUF_LEN, true },
	};
	uint16_t head = virtq_add(&rxq, segs, 2);

	/* The chain's head identifies the buffer when it comes back. */
	if (head >= rxq.size)
		fail("NET rx head %u", head);
}

static unsigned rx_index(uint16_t head)
{
	/* Each chain takes two descriptors; find whose header it holds. */
	uint64_t a = rxq.desc[head].addr;

	for (unsigned i = 0; i < nbufs; i++) {
		if (a == dma_addr(rx_hdr[i]))
			return i;
	}
	fail("NET rx used head %u points at no receive buffer", head);
}

static void send_frames(void)
{
	uint8_t *hdr = dma_alloc(NET_HDR_LEN, 16);
	uint8_t *frame = dma_alloc(ETH_ZLEN + 32, 16);

	for (unsigned i = 0; i < TX_FRAMES; i++) {
		char text[] = "bhyvepy-guest-frame 0";
		struct virtq_seg segs[2] = {
			{ hdr, NET_HDR_LEN, false },
			{ frame, ETH_ZLEN, false },
		};

		text[sizeof(text) - 2] = (char)('0' + i);
		memset(frame, 0, ETH_ZLEN);
		memset(frame, 0xff, 6);
		memcpy(frame + 6, mac, 6);
		frame[12] = ETHERTYPE >> 8;
		frame[13] = ETHERTYPE & 0xff;
		memcpy(frame + ETH_HLEN, text, sizeof(text) - 1);
		virtq_call(&txq, segs, 2);
		kprintf("NET TX %u len=%u\n", i, ETH_ZLEN);
	}
}

static void receive(void)
{
	unsigned shown = 0, ignored = 0;

	/* The host sends when it likes: no watchdog while waiting for it. */
	virtio_watchdog_count = 0;
	for (;;) {
		uint16_t head;
		uint32_t len;

		virtq_wait(&rxq);
		while (virtq_pop(&rxq, &head, &len)) {
			unsigned i = rx_index(head);
			const uint8_t *f = rx_buf[i];
			uint32_t n;
			bool quit;

			if (len < NET_HDR_LEN + ETH_HLEN ||
			    len > NET_HDR_LEN + RX_BUF_LEN)
				fail("NET rx used length %u", len);
			n = len - NET_HDR_LEN;
			if ((f[12] << 8 | f[13]) != ETHERTYPE) {
				ignored++;
				post_rx(i);
				continue;
			}
			kprintf("NET RX len=%u ", n);
			print_hex(f, n < RX_SHOW ? n : RX_SHOW);
			kprintf("\n");
			shown++;
			quit = n >= ETH_HLEN + 4 &&
			       !memcmp(f + ETH_HLEN, "quit", 4);
			post_rx(i);
			if (quit) {
				kprintf("VIRTIO-NET DONE tx=%u rx=%u ignored=%u\n",
					TX_FRAMES, shown, ignored);
				return;
			}
		}
		virtq_kick(&rxq);
	}
}

void guest_main(void)
{
	uint8_t dest = intr_platform_init();
	uint16_t bdf;
	uint32_t feats;

	pcifw_setup();
	if (!virtio_find(VIRTIO_TYPE_NET, 0, &bdf))
		fail("no virtio-net function on bus 0");
	virtio_begin(&dev, bdf);
	feats = virtio_negotiate(&dev, NET_F_MAC | NET_F_STATUS);
	virtio_setup_interrupts(&dev, 2, true, dest);
	virtq_setup(&dev, &rxq, Q_RX);
	virtq_setup(&dev, &txq, Q_TX);
	virtio_driver_ok(&dev);

	if (feats & NET_F_MAC) {
		for (unsigned i = 0; i < 6; i++)
			mac[i] = virtio_cfg_read8(&dev, i);
	} else {
		/* Locally administered, for a device that names none. */
		static const uint8_t fallback[6] = { 2, 0, 0, 0x62, 0x70, 1 };

		memcpy(mac, fallback, 6);
	}
	kprintf("NET pci=%02x:%02x.%x host-features=%08x features=%08x "
		"irq=%s rx-size=%u tx-size=%u\n", PCI_BUS(bdf), PCI_DEV(bdf),
		PCI_FN(bdf), dev.host_features, feats, virtio_irq_name(&dev),
		rxq.size, txq.size);
	kprintf("NET MAC %02x:%02x:%02x:%02x:%02x:%02x%s", mac[0], mac[1],
		mac[2], mac[3], mac[4], mac[5],
		feats & NET_F_MAC ? "" : " (none offered)");
	if (feats & NET_F_STATUS)
		kprintf(" link=%s", virtio_cfg_read16(&dev, 6) & NET_S_LINK_UP
			? "up" : "down");
	kprintf("\n");

	/* Two descriptors a buffer; small queues get fewer buffers. */
	nbufs = rxq.size / 2 < RX_BUFS ? rxq.size / 2u : RX_BUFS;
	for (unsigned i = 0; i < nbufs; i++) {
		rx_hdr[i] = dma_alloc(NET_HDR_LEN, 16);
		rx_buf[i] = dma_alloc(RX_BUF_LEN, 16);
		post_rx(i);
	}
	virtq_kick(&rxq);

	send_frames();
	kprintf("NET READY\n");
	receive();
}
