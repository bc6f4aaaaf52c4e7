/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/* The policy datapath contract (docs/datapath.md): map keys and values, flags, reasons.
 * pkg/datapath mirrors every definition here in Go; keep both in step with the document. */
#ifndef MESHCRYPT_DATAPATH_H
#define MESHCRYPT_DATAPATH_H

#include <linux/types.h>

/* Reserved identities. 0 never names an identity; in policy keys it means "any". */
#define IDENTITY_ANY 0
#define IDENTITY_WORLD 2

/* ipcache: LPM trie, IP/prefix -> identity. IPv4 is stored as ::ffff:a.b.c.d with
 * prefixlen = 96 + bits. */
struct ipcache_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct ipcache_val {
	__u32 identity;
	__u32 flags;
};

#define IPCACHE_LOCAL_POD (1U << 0)    /* this node's pod */
#define IPCACHE_TUNNEL_READY (1U << 1) /* remote pod CIDR whose tunnel peer is configured */
#define IPCACHE_REMOTE_POD (1U << 2)   /* a pod (or pod CIDR) on another node */

#define IPCACHE_MAX_ENTRIES (1U << 17)

/* policy: hash of allow entries. */
struct policy_key {
	__u32 subject;
	__u32 peer;  /* 0 = any identity */
	__u16 dport; /* host order; 0 = any port */
	__u8 proto;  /* 0 = any protocol */
	__u8 dir;    /* DIR_EGRESS or DIR_INGRESS */
};

struct policy_val {
	__u32 flags;
	__u32 rule; /* opaque to the datapath: the agent maps it back to a policy rule */
};

#define POLICY_ENCRYPT (1U << 0)

#define POLICY_MAX_ENTRIES (1U << 18)

#define DIR_EGRESS 0  /* the subject sends to the peer */
#define DIR_INGRESS 1 /* the subject receives from the peer */

/* enforce: hash, which identities are default-deny (and must encrypt) in which direction. */
struct enforce_key {
	__u32 identity;
	__u8 dir;
	__u8 pad[3];
};

struct enforce_val {
	__u32 flags;
};

#define ENFORCE_DENY (1U << 0)
#define ENFORCE_ENCRYPT (1U << 1)

#define ENFORCE_MAX_ENTRIES (1U << 17)

/* metrics: per-CPU array indexed by reason. */
enum reason {
	REASON_ALLOWED = 0,
	REASON_DENIED_EGRESS = 1,
	REASON_DENIED_INGRESS = 2,
	REASON_DROP_NOT_ENCRYPTED = 3,
	REASON_DROP_MALFORMED = 4,
	REASON_PASS_NON_IP = 5,
	REASON_ALLOWED_NO_POLICY = 6,
	REASONS = 7,
};

#define METRICS_MAX_ENTRIES 16 /* REASONS rounded up, room to grow */

struct metrics_val {
	__u64 packets;
	__u64 bytes;
};

/* config[0] flags. */
#define CONFIG_STRICT (1U << 0) /* every packet to a remote pod needs a ready tunnel */

#endif /* MESHCRYPT_DATAPATH_H */
