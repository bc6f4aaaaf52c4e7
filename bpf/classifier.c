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
	__u8 tcp_flags; /* TCP only: byte 13 of the header (flow events) */
};

#define TCP_FLAGS_OFF 13 /* offset of the flags byte in the TCP header */
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

static __always_inline int parse_l4(struct __sk_buff *skb, struct packet *p, __u32 off)
{
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
		return PARSE_OK;
	}
	case IPPROTO_UDP: {
		struct udphdr uh;

		if (bpf_skb_load_bytes(skb, off, &uh, sizeof(uh)) < 0)
			return PARSE_MALFORMED;
		p->sport = bpf_ntohs(uh.source);
		p->dport = bpf_ntohs(uh.dest);
		return PARSE_OK;
	}
	case IPPROTO_ICMP:
		if (off + ICMP_MIN_LEN > p->len)
			return PARSE_MALFORMED;
		return PARSE_OK;
	case IPPROTO_ICMPV6: {
		__u8 type;

		if (off + ICMP_MIN_LEN > p->len)
			return PARSE_MALFORMED;
		if (bpf_skb_load_bytes(skb, off, &type, 1) < 0)
			return PARSE_MALFORMED;
		/* Neighbour discovery (router/neighbour solicitation and advertisement, redirect:
		 * types 133-137) is IPv6's ARP: it passes like ARP, or default-deny egress would
		 * cut an IPv6 pod off its gateway. */
		if (type >= 133 && type <= 137)
			return PARSE_NON_IP;
		return PARSE_OK;
	}
	default:
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

static __always_inline void flow_count(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&flow_stats, &stat);

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
 * lookup. src is looked up only when an event is written and the verdict did not need it
 * (lookup_src). */
static __always_inline void flow_observe(struct __sk_buff *skb, struct packet *p,
					 struct ipcache_val *src, struct ipcache_val *dst,
					 int lookup_src, __u32 reason, const int from_pod)
{
	__u32 key = CONFIG_FLOW_RATE, zero = 0, cls = FLOW_CLASS_DROP, flags = 0, peer;
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
		flow_count(FLOW_STAT_RATE_LIMITED);
		return;
	}
	if (lookup_src)
		*src = lookup_identity(&p->src);

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
		flow_count(FLOW_STAT_LOST);
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
	flow_count(FLOW_STAT_SUBMITTED);
}

/* decide finds the reason (and with it the verdict) for a parsed IP packet. It fills *src and
 * *dst with what the ipcache says, and sets *lookup_src when it did not need the source. */
static __always_inline __u32 decide(struct packet *p, struct ipcache_val *src,
				    struct ipcache_val *dst, int *lookup_src, const int from_pod)
{
	__u32 ef_src = 0, ef_dst, pf_egress = 0, pf_ingress;

	*dst = lookup_identity(&p->dst);
	ef_dst = enforce_flags(dst->identity, DIR_INGRESS);
	if (!from_pod && !(ef_dst & ENFORCE_DENY)) {
		/* to_pod checks only the pod's ingress: without default-deny the source's
		 * identity does not matter, and its trie lookup is saved. */
		*lookup_src = 1;
		return REASON_ALLOWED_NO_POLICY;
	}
	*src = lookup_identity(&p->src);

	if (from_pod) {
		ef_src = enforce_flags(src->identity, DIR_EGRESS);
		if (!check_dir(src->identity, dst->identity, p->proto, p->dport, DIR_EGRESS, ef_src,
			       &pf_egress))
			return REASON_DENIED_EGRESS;
	}
	if (!check_dir(dst->identity, src->identity, p->proto, p->dport, DIR_INGRESS, ef_dst,
		       &pf_ingress))
		return REASON_DENIED_INGRESS;

	/* Traffic to a remote pod that must be encrypted never leaves in clear: without a ready
	 * tunnel for the destination it is dropped here. Strict mode requires it of all. */
	if (from_pod && !(dst->flags & IPCACHE_LOCAL_POD) && (dst->flags & IPCACHE_REMOTE_POD) &&
	    !(dst->flags & IPCACHE_TUNNEL_READY)) {
		__u32 key = CONFIG_FLAGS;
		__u32 *cfg = bpf_map_lookup_elem(&config, &key);

		if ((cfg && (*cfg & CONFIG_STRICT)) || ((pf_egress | pf_ingress) & POLICY_ENCRYPT) ||
		    ((ef_src | ef_dst) & ENFORCE_ENCRYPT))
			return REASON_DROP_NOT_ENCRYPTED;
	}

	if ((ef_src | ef_dst) & ENFORCE_DENY)
		return REASON_ALLOWED;
	return REASON_ALLOWED_NO_POLICY;
}

static __always_inline int classify(struct __sk_buff *skb, const int from_pod)
{
	struct packet p = {};
	struct ipcache_val src = {}, dst = {};
	int lookup_src = 0, verdict;
	__u32 reason;

	switch (parse(skb, &p)) {
	case PARSE_OK:
		reason = decide(&p, &src, &dst, &lookup_src, from_pod);
		break;
	case PARSE_NON_IP:
		/* Not a flow: no event. */
		return account(skb, REASON_PASS_NON_IP, VERDICT_PASS);
	default:
		/* Identities stay 0 (unknown) in its event. */
		reason = REASON_DROP_MALFORMED;
		break;
	}

	/* The verdict is fixed here; the flow event cannot change it. */
	verdict = reason_drops(reason) ? VERDICT_DROP : VERDICT_PASS;

	account(skb, reason, verdict);
	flow_observe(skb, &p, &src, &dst, lookup_src, reason, from_pod);
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
