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

/* config: array of __u32, indexed by CONFIG_*. */
#define CONFIG_FLAGS 0       /* node-wide flags (CONFIG_STRICT) */
#define CONFIG_FLOW_RATE 1   /* flow events per second and CPU, for drops and for allowed samples
			      * each; 0: no flow events at all */
#define CONFIG_FLOW_SAMPLE 2 /* 1 in N allowed packets per CPU, and every TCP SYN, is a candidate
			      * for an event; 0: drops only */
#define CONFIG_EPOCH 3       /* the policy epoch: the agent bumps it whenever the ipcache, policy,
			      * enforce maps or strict mode change; a tracked connection judged
			      * at an older epoch is judged again (docs/datapath.md, "Connections") */
#define CONFIG_MAX_ENTRIES 4

/* config[CONFIG_FLAGS] flags. */
#define CONFIG_STRICT (1U << 0) /* every packet to a remote pod needs a ready tunnel */

/* flow_events: a ring buffer of struct flow_event (docs/datapath.md, "Flow events"). */
#define FLOW_RING_SIZE (1U << 18) /* bytes: about 3600 events */

struct flow_event {
	__u64 time;         /* bpf_ktime_get_boot_ns() */
	__u32 src_identity; /* 0: not known (a malformed packet) */
	__u32 dst_identity;
	__u8 src_addr[16];  /* as in ipcache keys: IPv4 as ::ffff:a.b.c.d; all zero: not parsed */
	__u8 dst_addr[16];
	__u16 sport;        /* host order; 0 for port-less protocols and non-first fragments */
	__u16 dport;
	__u32 len;          /* skb->len: Ethernet header included */
	__u32 ifindex;      /* skb->ifindex: the pod's host-side interface */
	__u8 proto;
	__u8 reason;        /* enum reason */
	__u8 flags;         /* FLOW_* */
	__u8 tcp_flags;     /* byte 13 of the TCP header (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10...) */
};

#define FLOW_TO_POD (1U << 0)    /* seen by to_pod (delivered to the pod); else by from_pod */
#define FLOW_REMOTE (1U << 1)    /* the peer (from_pod: destination; to_pod: source) is a pod on
				  * another node */
#define FLOW_ENCRYPTED (1U << 2) /* passed, and the peer's tunnel is ready: the packet goes into
				  * (from_pod) or came out of (to_pod) the encrypted tunnel */
#define FLOW_SAMPLED (1U << 3)   /* an allowed packet picked by the 1-in-N sampler (not a TCP SYN) */
#define FLOW_TRACKED (1U << 4)   /* passed by the connection table, not judged anew */
#define FLOW_REPLY (1U << 5)     /* FLOW_TRACKED, going from the responder to the originator, or an
				  * ICMP error about a tracked connection */

/* flow_state: per-CPU rate limiter and sampler state. */
struct flow_cpu {
	__u64 refill[2]; /* FLOW_CLASS_*: boot-time ns of the last refill */
	__u32 tokens[2]; /* FLOW_CLASS_*: events left */
	__u32 countdown; /* allowed packets to skip before the next sample */
	__u32 pad;
};

#define FLOW_CLASS_DROP 0
#define FLOW_CLASS_ALLOW 1

/* flow_stats: per-CPU array of __u64 counters. */
enum flow_stat {
	FLOW_STAT_SUBMITTED = 0,    /* events written to the ring */
	FLOW_STAT_LOST = 1,         /* events the ring had no room for */
	FLOW_STAT_RATE_LIMITED = 2, /* candidates the rate limit suppressed */
	FLOW_STATS = 3,
};

#define FLOW_STATS_MAX_ENTRIES 4

/* conntrack: LRU hash of connections (docs/datapath.md, "Connections"). The key is the
 * connection's two endpoints in a fixed order (a before b), so both directions find the one
 * entry. */
struct ct_key {
	__u8 addr_a[16]; /* as in ipcache keys: IPv4 as ::ffff:a.b.c.d */
	__u8 addr_b[16];
	__u16 port_a;    /* host order; TCP/UDP ports, ICMP echo: the identifier on the requester's
			  * side and 0 on the responder's */
	__u16 port_b;
	__u8 proto;
	__u8 pad[3];
};

struct ct_entry {
	__u64 seen;         /* bpf_ktime_get_boot_ns() of the last refresh (at most 1 s old) */
	__u32 epoch;        /* config[CONFIG_EPOCH] when the connection was last judged */
	__u32 src_identity; /* the originator's identity when last judged */
	__u32 dst_identity; /* the responder's */
	__u8 src_flags;     /* the originator's ipcache flags when last judged */
	__u8 dst_flags;     /* the responder's */
	__u8 reason;        /* REASON_ALLOWED or REASON_ALLOWED_NO_POLICY */
	__u8 flags;         /* CT_* */
};

#define CT_ORIG_A (1U << 0)    /* the originator is endpoint a of the key */
#define CT_FROM_POD (1U << 1)  /* judged by from_pod (egress and ingress); else by to_pod (ingress) */
#define CT_REQUIRED (1U << 2)  /* must be encrypted cross-node, both directions */
#define CT_REPLIED (1U << 3)   /* the responder has sent a packet */
#define CT_FIN_ORIG (1U << 4)  /* TCP: the originator sent FIN */
#define CT_FIN_REPLY (1U << 5) /* TCP: the responder sent FIN */
#define CT_RST (1U << 6)       /* TCP: either side sent RST */

#define CT_MAX_ENTRIES (1U << 18) /* the default; the agent sets the size at load */

/* Idle timeouts, nanoseconds. */
#define CT_TIMEOUT_TCP_SYN (60ULL * 1000000000ULL)      /* TCP not yet answered */
#define CT_TIMEOUT_TCP (21600ULL * 1000000000ULL)       /* TCP answered: 6 hours */
#define CT_TIMEOUT_TCP_CLOSE (10ULL * 1000000000ULL)    /* TCP after RST, or FIN both ways */
#define CT_TIMEOUT_OTHER (60ULL * 1000000000ULL)        /* UDP, ICMP echo, other protocols */
#define CT_REFRESH (1000000000ULL)                      /* seen is rewritten at most once a second */

/* ct_stats: per-CPU array of __u64 counters. */
enum ct_stat {
	CT_STAT_CREATED = 0,       /* connections entered */
	CT_STAT_CREATE_FAILED = 1, /* allowed first packets whose entry could not be written: their
				    * replies are judged on their own, never allowed blindly */
	CT_STAT_REJUDGED = 2,      /* packets of a connection judged again after an epoch change */
	CT_STATS = 3,
};

#define CT_STATS_MAX_ENTRIES 4

#endif /* MESHCRYPT_DATAPATH_H */
