// SPDX-License-Identifier: (MIT OR GPL-2.0)
/* The meshcrypt policy classifier (docs/datapath.md).
 *
 * from_pod runs at ingress of a local pod's host-side interface (packets leaving the pod):
 * it checks the source's egress and the destination's ingress policy, then the encryption
 * requirement, so denied traffic never reaches the tunnel or the wire. to_pod runs at egress
 * of that interface (packets delivered to the pod) and checks the pod's ingress again.
 *
 * Parsing follows docs/datapath.md, with these precisions (the Go model in
 * pkg/datapath/classifier_packet_test.go states the same): the IP version nibble must match the
 * EtherType; an IPv4 header needs IHL >= 5 and all IHL*4 bytes; every IPv6 extension header must
 * fit in the frame, and a chain longer than 8 is malformed; TCP needs its 20-byte header and a
 * data offset of 5..15 within the frame, UDP 8 bytes, ICMP and ICMPv6 8 bytes; other protocols
 * need nothing (dport 0). Whatever falls short is DROP_MALFORMED. Non-first fragments are not
 * parsed beyond the fragment header (dport 0).
 *
 * Flow events: after the verdict, flow_observe offers the packet to a ring buffer the agent
 * reads (every drop and sampled allowed packets, rate-limited per CPU; docs/datapath.md). It
 * runs after the verdict is fixed and cannot change it; a full ring only counts a lost event.
 *
 * Headers are read with bpf_skb_load_bytes rather than direct packet access: it works on
 * non-linear skbs without pulling (or unsharing) them, and it keeps the verifier's work small
 * (offsets are plain scalars, no packet-pointer ranges to track through the extension-header
 * loop). The verdict's helpers exist since Linux 4.x; the flow event ring buffer and
 * bpf_ktime_get_boot_ns need Linux 5.8. The one loop is bounded (8 iterations). */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "datapath.h"

char __license[] SEC("license") = "Dual MIT/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, IPCACHE_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_val);
} ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, POLICY_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct policy_key);
	__type(value, struct policy_val);
} policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ENFORCE_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct enforce_key);
	__type(value, struct enforce_val);
} enforce SEC(".maps");

/* config[CONFIG_*]: node-wide flags and the flow event knobs. An array, so every entry exists
 * (zero until the agent sets it). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CONFIG_MAX_ENTRIES);
	__type(key, __u32);
	__type(value, __u32);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, METRICS_MAX_ENTRIES);
	__type(key, __u32);
	__type(value, struct metrics_val);
} metrics SEC(".maps");

/* The connection table (docs/datapath.md, "Connections"). Its size is set by the agent at load
 * (CT_MAX_ENTRIES by default). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CT_MAX_ENTRIES);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
} conntrack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CT_STATS_MAX_ENTRIES);
	__type(key, __u32);
	__type(value, __u64);
} ct_stats SEC(".maps");

/* Flow events (docs/datapath.md): the ring the agent reads, the per-CPU sampler and rate
 * limiter, and the per-CPU counters of what became of the candidates. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, FLOW_RING_SIZE);
} flow_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flow_cpu);
} flow_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FLOW_STATS_MAX_ENTRIES);
	__type(key, __u32);
	__type(value, __u64);
} flow_stats SEC(".maps");

/* A packet the classifier lets through goes on to whatever else is attached to the hook (the
 * CNI's own programs, later TCX programs, legacy tc filters): TC_ACT_UNSPEC is TCX_NEXT, and for
 * cls_bpf "continue with the next filter"; with nothing after it the packet passes. TC_ACT_OK
 * would end the chain and silently bypass a CNI that filters on the same interface. */
#define VERDICT_PASS TC_ACT_UNSPEC
#define VERDICT_DROP TC_ACT_SHOT

#define IP_OFFSET_MASK 0x1fff   /* IPv4 fragment offset bits of frag_off */
#define IP6_OFFSET_MASK 0xfff8  /* IPv6 fragment offset bits of frag_off */
#define IPV6_MAX_EXT_HDRS 8     /* extension headers walked before giving up */
#define ICMP_MIN_LEN 8          /* type, code, checksum, rest of header (both families) */

/* The IPv6 fragment header (not in the uapi headers). */
struct ipv6_frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

/* Length of the IPv6 option/routing headers and of AH, in bytes, as their length byte claims. */
struct ipv6_ext_hdr {
	__u8 nexthdr;
	__u8 hdrlen;
};

enum parse_result {
	PARSE_OK,
	PARSE_NON_IP,
	PARSE_MALFORMED,
};

/* What the verdict needs from a packet. The addresses are kept as ipcache keys, so they are
 * looked up without copying. */
struct packet {
	struct ipcache_key src;
	struct ipcache_key dst;
	__u32 len;   /* skb->len: Ethernet header included */
	__u16 sport; /* host order; 0 for port-less protocols and non-first fragments */
	__u16 dport; /* host order; 0 for port-less protocols and non-first fragments */
	__u8 proto;
	__u8 tcp_flags; /* TCP only: byte 13 of the header (flow events, connection state) */
	__u8 ct;        /* CT_NONE, CT_TRACK, CT_LOOKUP or CT_ICMP_ERROR */
	__u16 ct_sport; /* the ports of the connection key: TCP/UDP ports; ICMP echo: the */
	__u16 ct_dport; /* identifier on the requester's side, 0 on the responder's */
	__u32 l4_off;   /* offset of the L4 header (ICMP errors: where the quoted packet starts - 8) */
};

/* What the connection table does with a packet. */
enum {
	CT_NONE = 0,       /* nothing: judged on its own (non-first fragments, other ICMP) */
	CT_TRACK = 1,      /* looked up; a new connection's allowed first packet is entered */
	CT_LOOKUP = 2,     /* looked up, never entered (ICMP echo replies) */
	CT_ICMP_ERROR = 3, /* an ICMP error: related to the connection of the packet it quotes */
};

#define TCP_FLAGS_OFF 13 /* offset of the flags byte in the TCP header */
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

/* The first 8 bytes of an ICMP or ICMPv6 header; id is the echo identifier. */
struct icmp_head {
	__u8 type;
	__u8 code;
	__be16 csum;
	__be16 id;
	__be16 seq;
};

/* ICMP errors that quote a packet of a connection: destination unreachable (fragmentation
 * needed among them), time exceeded, parameter problem; ICMPv6 also packet too big. */
#define ICMP_ERROR(t) ((t) == 3 || (t) == 11 || (t) == 12)
#define ICMPV6_ERROR(t) ((t) >= 1 && (t) <= 4)

/* parse_icmp sets what the connection table does with an ICMP message: echo requests are
 * tracked as connections keyed by their identifier, echo replies looked up, errors related to
 * the connection they quote; other messages are judged on their own. */
static __always_inline int parse_icmp(struct packet *p, __u8 type, __u8 echo, __u8 echo_reply,
				      __be16 id, int error)
{
	if (type == echo) {
		p->ct = CT_TRACK;
		p->ct_sport = bpf_ntohs(id);
	} else if (type == echo_reply) {
		p->ct = CT_LOOKUP;
		p->ct_dport = bpf_ntohs(id);
	} else if (error) {
		p->ct = CT_ICMP_ERROR;
	}
	return PARSE_OK;
}

static __always_inline int parse_l4(struct __sk_buff *skb, struct packet *p, __u32 off)
{
	p->l4_off = off;
	switch (p->proto) {
	case IPPROTO_TCP: {
		struct tcphdr th;

		if (bpf_skb_load_bytes(skb, off, &th, sizeof(th)) < 0)
			return PARSE_MALFORMED;
		if (th.doff < 5 || off + th.doff * 4 > p->len)
			return PARSE_MALFORMED;
		p->sport = bpf_ntohs(th.source);
		p->dport = bpf_ntohs(th.dest);
		p->tcp_flags = ((__u8 *)&th)[TCP_FLAGS_OFF];
		p->ct = CT_TRACK;
		p->ct_sport = p->sport;
		p->ct_dport = p->dport;
		return PARSE_OK;
	}
	case IPPROTO_UDP: {
		struct udphdr uh;

		if (bpf_skb_load_bytes(skb, off, &uh, sizeof(uh)) < 0)
			return PARSE_MALFORMED;
		p->sport = bpf_ntohs(uh.source);
		p->dport = bpf_ntohs(uh.dest);
		p->ct = CT_TRACK;
		p->ct_sport = p->sport;
		p->ct_dport = p->dport;
		return PARSE_OK;
	}
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6: {
		struct icmp_head ih;

		if (off + ICMP_MIN_LEN > p->len)
			return PARSE_MALFORMED;
		if (bpf_skb_load_bytes(skb, off, &ih, sizeof(ih)) < 0)
			return PARSE_MALFORMED;
		if (p->proto == IPPROTO_ICMPV6) {
			/* Neighbour discovery (router/neighbour solicitation and advertisement,
			 * redirect: types 133-137) is IPv6's ARP: it passes like ARP, or
			 * default-deny egress would cut an IPv6 pod off its gateway. */
			if (ih.type >= 133 && ih.type <= 137)
				return PARSE_NON_IP;
			return parse_icmp(p, ih.type, 128, 129, ih.id, ICMPV6_ERROR(ih.type));
		}
		return parse_icmp(p, ih.type, 8, 0, ih.id, ICMP_ERROR(ih.type));
	}
	default:
		p->ct = CT_TRACK;
		return PARSE_OK;
	}
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct packet *p)
{
	struct iphdr ip;
	__u32 off;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return PARSE_MALFORMED;
	if (ip.version != 4 || ip.ihl < 5)
		return PARSE_MALFORMED;
	off = ETH_HLEN + ip.ihl * 4;
	if (off > p->len)
		return PARSE_MALFORMED;

	p->src.prefixlen = 128;
	p->src.addr[10] = 0xff;
	p->src.addr[11] = 0xff;
	__builtin_memcpy(&p->src.addr[12], &ip.saddr, 4);
	p->dst.prefixlen = 128;
	p->dst.addr[10] = 0xff;
	p->dst.addr[11] = 0xff;
	__builtin_memcpy(&p->dst.addr[12], &ip.daddr, 4);
	p->proto = ip.protocol;

	/* A non-first fragment carries no L4 header: only port-less rules can allow it. */
	if (ip.frag_off & bpf_htons(IP_OFFSET_MASK))
		return PARSE_OK;
	return parse_l4(skb, p, off);
}

static __always_inline int ipv6_is_ext(__u8 nh)
{
	return nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS ||
	       nh == IPPROTO_FRAGMENT || nh == IPPROTO_AH;
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, struct packet *p)
{
	struct ipv6hdr ip6;
	__u32 off = ETH_HLEN + sizeof(struct ipv6hdr);
	__u8 nh;
	int i;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
		return PARSE_MALFORMED;
	if (ip6.version != 6)
		return PARSE_MALFORMED;

	p->src.prefixlen = 128;
	__builtin_memcpy(p->src.addr, &ip6.saddr, 16);
	p->dst.prefixlen = 128;
	__builtin_memcpy(p->dst.addr, &ip6.daddr, 16);
	nh = ip6.nexthdr;

	for (i = 0; i < IPV6_MAX_EXT_HDRS; i++) {
		if (nh == IPPROTO_FRAGMENT) {
			struct ipv6_frag_hdr fh;

			if (bpf_skb_load_bytes(skb, off, &fh, sizeof(fh)) < 0)
				return PARSE_MALFORMED;
			nh = fh.nexthdr;
			off += sizeof(fh);
			if (fh.frag_off & bpf_htons(IP6_OFFSET_MASK)) {
				/* Non-first fragment: as IPv4, no L4 header. */
				p->proto = nh;
				return PARSE_OK;
			}
		} else if (ipv6_is_ext(nh)) {
			struct ipv6_ext_hdr eh;

			if (bpf_skb_load_bytes(skb, off, &eh, sizeof(eh)) < 0)
				return PARSE_MALFORMED;
			if (nh == IPPROTO_AH)
				off += ((__u32)eh.hdrlen + 2) * 4;
			else
				off += ((__u32)eh.hdrlen + 1) * 8;
			nh = eh.nexthdr;
			if (off > p->len)
				return PARSE_MALFORMED;
		} else {
			break;
		}
	}
	/* A chain longer than we walk is treated as malformed rather than guessed at. */
	if (ipv6_is_ext(nh))
		return PARSE_MALFORMED;
	p->proto = nh;
	return parse_l4(skb, p, off);
}

static __always_inline int parse(struct __sk_buff *skb, struct packet *p)
{
	__be16 proto;

	p->len = skb->len;
	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto)) < 0)
		return PARSE_MALFORMED;
	if (proto == bpf_htons(ETH_P_IP))
		return parse_ipv4(skb, p);
	if (proto == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(skb, p);
	return PARSE_NON_IP;
}

static __always_inline int account(struct __sk_buff *skb, __u32 reason, int verdict)
{
	struct metrics_val *m = bpf_map_lookup_elem(&metrics, &reason);

	if (m) {
		m->packets++;
		m->bytes += skb->len;
	}
	return verdict;
}

static __always_inline struct ipcache_val lookup_identity(struct ipcache_key *addr)
{
	struct ipcache_val *v = bpf_map_lookup_elem(&ipcache, addr);
	struct ipcache_val world = {.identity = IDENTITY_WORLD};

	return v ? *v : world;
}

static __always_inline __u32 enforce_flags(__u32 identity, __u8 dir)
{
	struct enforce_key k = {.identity = identity, .dir = dir};
	struct enforce_val *v = bpf_map_lookup_elem(&enforce, &k);

	return v ? v->flags : 0;
}

/* check_dir decides one direction for subject S talking to peer P. It returns 1 when allowed
 * and sets *flags to the allowing entry's flags (0 when allowed without an entry). Lookups go
 * from the most to the least specific key; with dport 0 the port-specific keys equal the
 * port-less ones and are skipped. */
static __always_inline int check_dir(__u32 subject, __u32 peer, __u8 proto, __u16 dport,
				     __u8 dir, __u32 enforced, __u32 *flags)
{
	struct policy_key k = {
		.subject = subject,
		.peer = peer,
		.dport = dport,
		.proto = proto,
		.dir = dir,
	};
	struct policy_val *v;

	*flags = 0;
	if (!(enforced & ENFORCE_DENY))
		return 1;

	if (dport) {
		v = bpf_map_lookup_elem(&policy, &k); /* (S, P, pr, d) */
		if (v)
			goto found;
		k.dport = 0;
	}
	v = bpf_map_lookup_elem(&policy, &k); /* (S, P, pr, 0) */
	if (v)
		goto found;
	k.proto = 0;
	v = bpf_map_lookup_elem(&policy, &k); /* (S, P, 0, 0) */
	if (v)
		goto found;

	k.peer = IDENTITY_ANY;
	k.proto = proto;
	if (dport) {
		k.dport = dport;
		v = bpf_map_lookup_elem(&policy, &k); /* (S, 0, pr, d) */
		if (v)
			goto found;
		k.dport = 0;
	}
	v = bpf_map_lookup_elem(&policy, &k); /* (S, 0, pr, 0) */
	if (v)
		goto found;
	k.proto = 0;
	v = bpf_map_lookup_elem(&policy, &k); /* (S, 0, 0, 0) */
	if (v)
		goto found;
	return 0;

found:
	*flags = v->flags;
	return 1;
}

static __always_inline int reason_drops(__u32 reason)
{
	return reason == REASON_DENIED_EGRESS || reason == REASON_DENIED_INGRESS ||
	       reason == REASON_DROP_NOT_ENCRYPTED || reason == REASON_DROP_MALFORMED;
}

/* count increments counter stat of a per-CPU array of __u64 (flow_stats, ct_stats). */
static __always_inline void count(void *stats, __u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(stats, &stat);

	if (n)
		(*n)++;
}

/* flow_take_token takes one event from class cls's bucket on this CPU: rate per second,
 * bursts of up to rate. A bucket refills only once empty, from the time since its last refill
 * (capped at a second, so the arithmetic cannot overflow). */
static __always_inline int flow_take_token(struct flow_cpu *st, __u32 cls, __u32 rate, __u64 now)
{
	__u64 elapsed, add;

	if (cls > FLOW_CLASS_ALLOW)
		return 0;
	if (st->tokens[cls] == 0) {
		elapsed = now - st->refill[cls];
		if (elapsed >= 1000000000ULL)
			add = rate;
		else
			add = elapsed * rate / 1000000000ULL;
		if (add == 0)
			return 0;
		st->tokens[cls] = add > rate ? rate : add;
		st->refill[cls] = now;
	}
	st->tokens[cls]--;
	return 1;
}

/* flow_observe offers the packet just classified to the flow event ring. It never changes the
 * verdict, which is decided before it runs: whatever happens here (events off, not sampled,
 * rate-limited, ring full) the caller returns the same value. Events off costs one array
 * lookup. flags are the FLOW_* the caller knows (FLOW_TRACKED, FLOW_REPLY). */
static __always_inline void flow_observe(struct __sk_buff *skb, struct packet *p,
					 struct ipcache_val *src, struct ipcache_val *dst,
					 __u32 reason, const int from_pod,
					 __u32 flags)
{
	__u32 key = CONFIG_FLOW_RATE, zero = 0, cls = FLOW_CLASS_DROP, peer;
	__u32 *rate, *sample;
	struct flow_cpu *st;
	struct flow_event *e;
	__u64 now;

	rate = bpf_map_lookup_elem(&config, &key);
	if (!rate || *rate == 0)
		return;
	st = bpf_map_lookup_elem(&flow_state, &zero);
	if (!st)
		return;
	if (!reason_drops(reason)) {
		key = CONFIG_FLOW_SAMPLE;
		sample = bpf_map_lookup_elem(&config, &key);
		if (!sample || *sample == 0)
			return;
		if (p->proto == IPPROTO_TCP &&
		    (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
			/* A connection's first packet: always a candidate. */
		} else if (st->countdown > 0 && st->countdown < *sample) {
			st->countdown--;
			return;
		} else {
			st->countdown = *sample - 1;
			flags |= FLOW_SAMPLED;
		}
		cls = FLOW_CLASS_ALLOW;
	}
	now = bpf_ktime_get_boot_ns();
	if (!flow_take_token(st, cls, *rate, now)) {
		count(&flow_stats, FLOW_STAT_RATE_LIMITED);
		return;
	}

	peer = from_pod ? dst->flags : src->flags;
	if (!from_pod)
		flags |= FLOW_TO_POD;
	if ((peer & IPCACHE_REMOTE_POD) && !(peer & IPCACHE_LOCAL_POD)) {
		flags |= FLOW_REMOTE;
		if ((peer & IPCACHE_TUNNEL_READY) && !reason_drops(reason))
			flags |= FLOW_ENCRYPTED;
	}

	e = bpf_ringbuf_reserve(&flow_events, sizeof(*e), 0);
	if (!e) {
		count(&flow_stats, FLOW_STAT_LOST);
		return;
	}
	e->time = now;
	e->src_identity = src->identity;
	e->dst_identity = dst->identity;
	__builtin_memcpy(e->src_addr, p->src.addr, sizeof(e->src_addr));
	__builtin_memcpy(e->dst_addr, p->dst.addr, sizeof(e->dst_addr));
	e->sport = p->sport;
	e->dport = p->dport;
	e->len = skb->len;
	e->ifindex = skb->ifindex;
	e->proto = p->proto;
	e->reason = reason;
	e->flags = flags;
	e->tcp_flags = p->tcp_flags;
	bpf_ringbuf_submit(e, 0);
	count(&flow_stats, FLOW_STAT_SUBMITTED);
}

/* judgement is a policy decision about a connection's first packet, in the originator's
 * direction. */
struct judgement {
	struct ipcache_val src; /* the originator */
	struct ipcache_val dst; /* the responder */
	__u32 reason;           /* ALLOWED, ALLOWED_NO_POLICY, DENIED_EGRESS or DENIED_INGRESS */
	__u32 required;         /* the connection must be encrypted cross-node */
};

/* judge decides a connection src -> dst (proto, dport) by policy. from_pod checks the
 * originator's egress and the responder's ingress (the sender enforces the receiver's ingress
 * too, so denied traffic never reaches the wire); to_pod the responder's ingress only. It also
 * finds whether the connection must be encrypted: strict mode, a Required rule that allowed it,
 * or a Required policy selecting the originator's egress or the responder's ingress. */
static __always_inline void judge(struct ipcache_key *src, struct ipcache_key *dst, __u8 proto,
				  __u16 dport, struct judgement *j, int from_pod)
{
	__u32 ef_src, ef_dst, pf_egress = 0, pf_ingress = 0, key = CONFIG_FLAGS, *cfg;

	j->dst = lookup_identity(dst);
	j->src = lookup_identity(src);
	ef_dst = enforce_flags(j->dst.identity, DIR_INGRESS);
	ef_src = enforce_flags(j->src.identity, DIR_EGRESS);
	j->required = 0;

	if (from_pod && !check_dir(j->src.identity, j->dst.identity, proto, dport, DIR_EGRESS,
				   ef_src, &pf_egress)) {
		j->reason = REASON_DENIED_EGRESS;
		return;
	}
	if (!check_dir(j->dst.identity, j->src.identity, proto, dport, DIR_INGRESS, ef_dst,
		       &pf_ingress)) {
		j->reason = REASON_DENIED_INGRESS;
		return;
	}
	cfg = bpf_map_lookup_elem(&config, &key);
	if ((cfg && (*cfg & CONFIG_STRICT)) || ((pf_egress | pf_ingress) & POLICY_ENCRYPT) ||
	    ((ef_src | ef_dst) & ENFORCE_ENCRYPT))
		j->required = 1;
	if ((from_pod ? ef_src | ef_dst : ef_dst) & ENFORCE_DENY)
		j->reason = REASON_ALLOWED;
	else
		j->reason = REASON_ALLOWED_NO_POLICY;
}

/* unencrypted says whether a packet to an endpoint with ipcache flags to_flags, of a
 * connection that must be encrypted, would leave in clear: the endpoint is a pod on another
 * node whose tunnel is not ready. Only from_pod asks: to_pod delivers to a local pod. */
static __always_inline int unencrypted(__u32 required, __u32 to_flags)
{
	return required && !(to_flags & IPCACHE_LOCAL_POD) && (to_flags & IPCACHE_REMOTE_POD) &&
	       !(to_flags & IPCACHE_TUNNEL_READY);
}

/* ct_key_of fills k with the connection of (src sport) -> (dst dport) and returns 1 when src
 * is endpoint a. The order of the endpoints is any fixed total order: here the addresses as
 * four 32-bit words, then the ports. */
static __always_inline int ct_key_of(struct ct_key *k, const __u8 *src, const __u8 *dst,
				     __u16 sport, __u16 dport, __u8 proto)
{
	const __u32 *s = (const __u32 *)src, *d = (const __u32 *)dst;
	int src_a;

	if (s[0] != d[0])
		src_a = s[0] < d[0];
	else if (s[1] != d[1])
		src_a = s[1] < d[1];
	else if (s[2] != d[2])
		src_a = s[2] < d[2];
	else if (s[3] != d[3])
		src_a = s[3] < d[3];
	else
		src_a = sport <= dport;

	if (src_a) {
		__builtin_memcpy(k->addr_a, src, 16);
		__builtin_memcpy(k->addr_b, dst, 16);
		k->port_a = sport;
		k->port_b = dport;
	} else {
		__builtin_memcpy(k->addr_a, dst, 16);
		__builtin_memcpy(k->addr_b, src, 16);
		k->port_a = dport;
		k->port_b = sport;
	}
	k->proto = proto;
	return src_a;
}

static __always_inline int addr_eq(const __u8 *x, const __u8 *y)
{
	const __u32 *a = (const __u32 *)x, *b = (const __u32 *)y;

	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline __u64 ct_timeout(const struct ct_entry *e, __u8 proto)
{
	if (proto != IPPROTO_TCP)
		return CT_TIMEOUT_OTHER;
	if ((e->flags & CT_RST) ||
	    (e->flags & (CT_FIN_ORIG | CT_FIN_REPLY)) == (CT_FIN_ORIG | CT_FIN_REPLY))
		return CT_TIMEOUT_TCP_CLOSE;
	if (!(e->flags & CT_REPLIED))
		return CT_TIMEOUT_TCP_SYN;
	return CT_TIMEOUT_TCP;
}

static __always_inline int ct_closing(const struct ct_entry *e)
{
	return (e->flags & CT_RST) ||
	       (e->flags & (CT_FIN_ORIG | CT_FIN_REPLY)) == (CT_FIN_ORIG | CT_FIN_REPLY);
}

/* ct_current makes sure entry e of connection k holds a judgement made at epoch: when it was
 * judged at another one, it is judged again, as the program that entered it judged it, with
 * the originator's address and destination port from the key and identities from the ipcache
 * now. It returns the reason: a denial leaves the entry as it was (its packets keep being
 * judged until a policy allows them again or it times out). */
static __always_inline __u32 ct_current(struct ct_entry *e, const struct ct_key *k, __u32 epoch)
{
	struct ipcache_key a = {.prefixlen = 128}, b = {.prefixlen = 128};
	struct judgement j = {};
	__u16 dport;
	__u8 flags;

	if (e->epoch == epoch)
		return e->reason;
	count(&ct_stats, CT_STAT_REJUDGED);
	__builtin_memcpy(a.addr, k->addr_a, 16);
	__builtin_memcpy(b.addr, k->addr_b, 16);
	dport = (e->flags & CT_ORIG_A) ? k->port_b : k->port_a;
	if (k->proto != IPPROTO_TCP && k->proto != IPPROTO_UDP)
		dport = 0;
	if (e->flags & CT_ORIG_A)
		judge(&a, &b, k->proto, dport, &j, e->flags & CT_FROM_POD);
	else
		judge(&b, &a, k->proto, dport, &j, e->flags & CT_FROM_POD);
	if (reason_drops(j.reason))
		return j.reason;
	e->src_identity = j.src.identity;
	e->dst_identity = j.dst.identity;
	e->src_flags = j.src.flags;
	e->dst_flags = j.dst.flags;
	e->reason = j.reason;
	flags = e->flags & ~CT_REQUIRED;
	if (j.required)
		flags |= CT_REQUIRED;
	e->flags = flags;
	e->epoch = epoch;
	return j.reason;
}

/* tracked is what the connection table decided about a packet of a known connection. */
struct tracked {
	struct ipcache_val src; /* the packet's source, from the entry */
	struct ipcache_val dst; /* the packet's destination */
	__u32 reason;
	__u32 flow_flags; /* FLOW_TRACKED, FLOW_REPLY */
};

/* ct_known looks p up in the connection table. It returns 1 and fills *t when the packet
 * belongs to a live connection (or, for an ICMP error, quotes one) that policy still allows
 * or, when policy no longer allows it, denies it; 0 when it is not known and must be judged
 * as a new connection. */
static __always_inline int ct_known(struct __sk_buff *skb, struct packet *p, struct tracked *t,
				    __u32 epoch, __u64 now, const int from_pod)
{
	struct ct_key k = {};
	struct ct_entry *e;
	__u32 reason, from_flags, to_flags, fwd;
	__u8 flags;
	int src_a;

	if (p->ct == CT_ICMP_ERROR) {
		/* The quoted packet: its IP header, then at least 8 bytes of its L4 header. It
		 * was sent by the error's destination. */
		__u32 off = p->l4_off + ICMP_MIN_LEN;
		__u8 inner_src[16] = {}, inner_dst[16] = {}, proto;
		__u16 ports[2] = {};

		if (p->proto == IPPROTO_ICMP) { /* quoting an IPv4 packet */
			struct iphdr ip;

			if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0 || ip.version != 4 ||
			    ip.ihl < 5)
				return 0;
			inner_src[10] = inner_src[11] = 0xff;
			inner_dst[10] = inner_dst[11] = 0xff;
			__builtin_memcpy(&inner_src[12], &ip.saddr, 4);
			__builtin_memcpy(&inner_dst[12], &ip.daddr, 4);
			proto = ip.protocol;
			off += ip.ihl * 4;
		} else {
			struct ipv6hdr ip6;

			if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0 || ip6.version != 6)
				return 0;
			__builtin_memcpy(inner_src, &ip6.saddr, 16);
			__builtin_memcpy(inner_dst, &ip6.daddr, 16);
			proto = ip6.nexthdr;
			off += sizeof(ip6);
		}
		if (!addr_eq(inner_src, p->dst.addr))
			return 0;
		if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
			if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)) < 0)
				return 0;
			ports[0] = bpf_ntohs(ports[0]);
			ports[1] = bpf_ntohs(ports[1]);
		} else if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
			struct icmp_head ih;

			if (bpf_skb_load_bytes(skb, off, &ih, sizeof(ih)) < 0)
				return 0;
			if (ih.type == (proto == IPPROTO_ICMP ? 8 : 128))
				ports[0] = bpf_ntohs(ih.id);
			else if (ih.type == (proto == IPPROTO_ICMP ? 0 : 129))
				ports[1] = bpf_ntohs(ih.id);
			else
				return 0;
		}
		src_a = ct_key_of(&k, inner_src, inner_dst, ports[0], ports[1], proto);
		e = bpf_map_lookup_elem(&conntrack, &k);
		if (!e || now - e->seen > ct_timeout(e, proto))
			return 0;
		reason = ct_current(e, &k, epoch);
		if (reason_drops(reason))
			return 0; /* no longer allowed: the error is judged on its own */
		/* The error goes to the quoted packet's sender. */
		fwd = !!(e->flags & CT_ORIG_A) == !!src_a; /* the quoted packet went orig -> resp */
		to_flags = fwd ? e->src_flags : e->dst_flags;
		t->reason = reason;
		t->flow_flags = FLOW_TRACKED | FLOW_REPLY;
		t->dst.identity = fwd ? e->src_identity : e->dst_identity;
		t->dst.flags = to_flags;
		t->src = lookup_identity(&p->src);
		if (from_pod && unencrypted(e->flags & CT_REQUIRED, to_flags))
			t->reason = REASON_DROP_NOT_ENCRYPTED;
		return 1;
	}

	src_a = ct_key_of(&k, p->src.addr, p->dst.addr, p->ct_sport, p->ct_dport, p->proto);
	e = bpf_map_lookup_elem(&conntrack, &k);
	if (!e)
		return 0;
	if (now - e->seen > ct_timeout(e, p->proto))
		return 0; /* timed out: a new connection */
	/* A TCP SYN on a closed connection opens a new one on the same ports. */
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN &&
	    ct_closing(e))
		return 0;

	fwd = !!(e->flags & CT_ORIG_A) == !!src_a; /* the packet goes originator -> responder */
	reason = ct_current(e, &k, epoch);
	if (reason_drops(reason)) {
		t->reason = reason;
		t->flow_flags = FLOW_TRACKED;
		t->src = lookup_identity(&p->src);
		t->dst = lookup_identity(&p->dst);
		return 1;
	}

	flags = e->flags;
	if (!fwd)
		flags |= CT_REPLIED;
	if (p->proto == IPPROTO_TCP) {
		if (p->tcp_flags & TCP_FLAG_FIN)
			flags |= fwd ? CT_FIN_ORIG : CT_FIN_REPLY;
		if (p->tcp_flags & TCP_FLAG_RST)
			flags |= CT_RST;
	}
	if (flags != e->flags)
		e->flags = flags;
	if (now - e->seen > CT_REFRESH)
		e->seen = now;

	from_flags = fwd ? e->src_flags : e->dst_flags;
	to_flags = fwd ? e->dst_flags : e->src_flags;
	t->src.identity = fwd ? e->src_identity : e->dst_identity;
	t->src.flags = from_flags;
	t->dst.identity = fwd ? e->dst_identity : e->src_identity;
	t->dst.flags = to_flags;
	t->reason = reason;
	t->flow_flags = fwd ? FLOW_TRACKED : FLOW_TRACKED | FLOW_REPLY;
	if (from_pod && unencrypted(e->flags & CT_REQUIRED, to_flags))
		t->reason = REASON_DROP_NOT_ENCRYPTED;
	return 1;
}

/* ct_enter enters the connection whose first packet p was just allowed. A failed write is
 * counted and changes nothing else: the packet is allowed (policy allowed it), and its replies
 * are judged on their own. */
static __always_inline void ct_enter(struct packet *p, struct judgement *j, __u32 epoch,
				     __u64 now, const int from_pod)
{
	struct ct_key k = {};
	struct ct_entry e = {
		.seen = now,
		.epoch = epoch,
		.src_identity = j->src.identity,
		.dst_identity = j->dst.identity,
		.src_flags = j->src.flags,
		.dst_flags = j->dst.flags,
		.reason = j->reason,
	};

	if (ct_key_of(&k, p->src.addr, p->dst.addr, p->ct_sport, p->ct_dport, p->proto))
		e.flags |= CT_ORIG_A;
	if (from_pod)
		e.flags |= CT_FROM_POD;
	if (j->required)
		e.flags |= CT_REQUIRED;
	if (p->proto == IPPROTO_TCP) {
		if (p->tcp_flags & TCP_FLAG_FIN)
			e.flags |= CT_FIN_ORIG;
		if (p->tcp_flags & TCP_FLAG_RST)
			e.flags |= CT_RST;
	}
	if (bpf_map_update_elem(&conntrack, &k, &e, BPF_ANY) == 0)
		count(&ct_stats, CT_STAT_CREATED);
	else
		count(&ct_stats, CT_STAT_CREATE_FAILED);
}

static __always_inline int classify(struct __sk_buff *skb, const int from_pod)
{
	struct packet p = {};
	struct tracked t = {};
	struct judgement j = {};
	__u32 reason, key = CONFIG_EPOCH, epoch = 0, *ep;
	__u64 now;
	int verdict;

	switch (parse(skb, &p)) {
	case PARSE_OK:
		break;
	case PARSE_NON_IP:
		/* Not a flow: no event. */
		return account(skb, REASON_PASS_NON_IP, VERDICT_PASS);
	default:
		/* Identities stay 0 (unknown) in its event. */
		reason = REASON_DROP_MALFORMED;
		verdict = VERDICT_DROP;
		account(skb, reason, verdict);
		flow_observe(skb, &p, &j.src, &j.dst, reason, from_pod, 0);
		return verdict;
	}

	/* The epoch is read before anything is judged: a judgement that raced a map change is
	 * recorded at the older epoch and made again. */
	ep = bpf_map_lookup_elem(&config, &key);
	if (ep)
		epoch = *ep;
	now = bpf_ktime_get_boot_ns();

	if (p.ct != CT_NONE && ct_known(skb, &p, &t, epoch, now, from_pod)) {
		reason = t.reason;
		verdict = reason_drops(reason) ? VERDICT_DROP : VERDICT_PASS;
		account(skb, reason, verdict);
		flow_observe(skb, &p, &t.src, &t.dst, reason, from_pod, t.flow_flags);
		return verdict;
	}

	judge(&p.src, &p.dst, p.proto, p.dport, &j, from_pod);
	reason = j.reason;
	/* Traffic to a remote pod that must be encrypted never leaves in clear: without a ready
	 * tunnel for the destination it is dropped here. */
	if (!reason_drops(reason) && from_pod && unencrypted(j.required, j.dst.flags))
		reason = REASON_DROP_NOT_ENCRYPTED;
	if (!reason_drops(reason) && p.ct == CT_TRACK)
		ct_enter(&p, &j, epoch, now, from_pod);

	/* The verdict is fixed here; the flow event cannot change it. */
	verdict = reason_drops(reason) ? VERDICT_DROP : VERDICT_PASS;
	account(skb, reason, verdict);
	flow_observe(skb, &p, &j.src, &j.dst, reason, from_pod, 0);
	return verdict;
}

/* from_pod: ingress of the pod's host-side interface, i.e. packets the pod sends. */
SEC("tc")
int from_pod(struct __sk_buff *skb)
{
	return classify(skb, 1);
}

/* to_pod: egress of the pod's host-side interface, i.e. packets delivered to the pod. */
SEC("tc")
int to_pod(struct __sk_buff *skb)
{
	return classify(skb, 0);
}

/* passthrough does nothing: the baseline of the classifier benchmark. */
SEC("tc")
int passthrough(struct __sk_buff *skb)
{
	return VERDICT_PASS;
}
