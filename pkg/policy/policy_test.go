package policy

import (
	"encoding/json"
	"testing"

	"github.com/google/go-cmp/cmp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

func ident(id uint32, ns string, kv ...string) Identity {
	l := map[string]string{LabelNamespace: ns}
	for i := 0; i+1 < len(kv); i += 2 {
		l[kv[i]] = kv[i+1]
	}
	return Identity{ID: id, Labels: l}
}

func sel(kv ...string) *metav1.LabelSelector {
	s := &metav1.LabelSelector{MatchLabels: map[string]string{}}
	for i := 0; i+1 < len(kv); i += 2 {
		s.MatchLabels[kv[i]] = kv[i+1]
	}
	return s
}

func port(p int32) *int32 { return &p }

func pol(ns, name string, spec v1alpha1.MeshPolicySpec) v1alpha1.MeshPolicy {
	return v1alpha1.MeshPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: spec}
}

// The identities of the tests: web and db in prod, web in dev, and world (no namespace).
var (
	web    = ident(300, "prod", "app", "web")
	db     = ident(301, "prod", "app", "db")
	devWeb = ident(400, "dev", "app", "web")
	world  = Identity{ID: 2, Labels: map[string]string{"reserved": "world"}}
	all    = []Identity{web, db, devWeb, world}
	nsl    = map[string]map[string]string{
		"prod": {"kubernetes.io/metadata.name": "prod", "env": "prod"},
		"dev":  {"kubernetes.io/metadata.name": "dev", "env": "dev"},
	}
)

type flow struct {
	src, dst uint32
	proto    uint8
	port     uint16
	allowed  bool
}

func TestCompileSemantics(t *testing.T) {
	tests := []struct {
		name  string
		pols  []v1alpha1.MeshPolicy
		flows []flow
	}{
		{
			name: "no policy allows everything",
			flows: []flow{
				{web.ID, db.ID, ProtoTCP, 5432, true},
				{world.ID, db.ID, ProtoUDP, 53, true},
			},
		},
		{
			name: "ingress to db only from web on 5432/TCP; default-deny for the rest",
			pols: []v1alpha1.MeshPolicy{pol("prod", "db", v1alpha1.MeshPolicySpec{
				EndpointSelector: *sel("app", "db"),
				Ingress: []v1alpha1.PolicyRule{{
					Peers: []v1alpha1.PolicyPeer{{PodSelector: sel("app", "web")}},
					Ports: []v1alpha1.PolicyPort{{Protocol: v1alpha1.ProtocolTCP, Port: port(5432)}},
				}},
			})},
			flows: []flow{
				{web.ID, db.ID, ProtoTCP, 5432, true},
				{web.ID, db.ID, ProtoTCP, 5433, false},
				{web.ID, db.ID, ProtoUDP, 5432, false},
				{devWeb.ID, db.ID, ProtoTCP, 5432, false}, // podSelector alone: own namespace only
				{world.ID, db.ID, ProtoTCP, 5432, false},
				{db.ID, web.ID, ProtoTCP, 80, true}, // web is not selected
			},
		},
		{
			name: "namespaceSelector across namespaces, any port",
			pols: []v1alpha1.MeshPolicy{pol("prod", "db", v1alpha1.MeshPolicySpec{
				EndpointSelector: *sel("app", "db"),
				Ingress: []v1alpha1.PolicyRule{{
					Peers: []v1alpha1.PolicyPeer{{NamespaceSelector: sel("env", "dev"), PodSelector: sel("app", "web")}},
				}},
			})},
			flows: []flow{
				{devWeb.ID, db.ID, ProtoUDP, 9, true},
				{web.ID, db.ID, ProtoTCP, 5432, false},
			},
		},
		{
			name: "egress policy: web may only reach db; its ingress stays open",
			pols: []v1alpha1.MeshPolicy{pol("prod", "web-out", v1alpha1.MeshPolicySpec{
				EndpointSelector: *sel("app", "web"),
				PolicyTypes:      []v1alpha1.PolicyType{v1alpha1.PolicyTypeEgress},
				Egress: []v1alpha1.PolicyRule{{
					Peers: []v1alpha1.PolicyPeer{{PodSelector: sel("app", "db")}},
					Ports: []v1alpha1.PolicyPort{{Protocol: v1alpha1.ProtocolICMP}, {Protocol: v1alpha1.ProtocolUDP}},
				}},
			})},
			flows: []flow{
				{web.ID, db.ID, ProtoICMP, 0, true},
				{web.ID, db.ID, ProtoICMPv6, 0, true},
				{web.ID, db.ID, ProtoUDP, 1234, true},
				{web.ID, db.ID, ProtoTCP, 80, false},
				{web.ID, world.ID, ProtoUDP, 53, false},
				{world.ID, web.ID, ProtoTCP, 80, true},
			},
		},
		{
			name: "empty ingress rules list with the type: deny all ingress",
			pols: []v1alpha1.MeshPolicy{pol("prod", "deny", v1alpha1.MeshPolicySpec{
				EndpointSelector: metav1.LabelSelector{},
				PolicyTypes:      []v1alpha1.PolicyType{v1alpha1.PolicyTypeIngress},
			})},
			flows: []flow{
				{web.ID, db.ID, ProtoTCP, 1, false},
				{devWeb.ID, web.ID, ProtoTCP, 1, false},
				{web.ID, devWeb.ID, ProtoTCP, 1, true}, // dev is not selected
			},
		},
		{
			name: "a rule with no peers allows every peer, world included; policies add up",
			pols: []v1alpha1.MeshPolicy{
				pol("prod", "a", v1alpha1.MeshPolicySpec{
					EndpointSelector: *sel("app", "web"),
					Ingress:          []v1alpha1.PolicyRule{{Ports: []v1alpha1.PolicyPort{{Port: port(443)}}}},
				}),
				pol("prod", "b", v1alpha1.MeshPolicySpec{
					EndpointSelector: *sel("app", "web"),
					Ingress:          []v1alpha1.PolicyRule{{Ports: []v1alpha1.PolicyPort{{Port: port(80)}}}},
				}),
			},
			flows: []flow{
				{world.ID, web.ID, ProtoTCP, 443, true},
				{world.ID, web.ID, ProtoTCP, 80, true},
				{world.ID, web.ID, ProtoTCP, 8080, false},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := Compile(Input{Policies: tt.pols, Identities: all, NamespaceLabels: nsl})
			if len(r.Skipped) != 0 {
				t.Fatalf("skipped: %v", r.Skipped)
			}
			for _, f := range tt.flows {
				d := r.Decide(f.src, f.dst, f.proto, f.port)
				if d.Allowed() != f.allowed {
					t.Errorf("%d -> %d proto %d port %d: allowed=%v, want %v (%+v)", f.src, f.dst, f.proto, f.port, d.Allowed(), f.allowed, d)
				}
			}
		})
	}
}

func TestExplainAndEncryption(t *testing.T) {
	r := Compile(Input{Identities: all, NamespaceLabels: nsl, Policies: []v1alpha1.MeshPolicy{
		pol("prod", "db", v1alpha1.MeshPolicySpec{
			EndpointSelector: *sel("app", "db"),
			Encryption:       v1alpha1.EncryptionRequired,
			Ingress: []v1alpha1.PolicyRule{
				{Peers: []v1alpha1.PolicyPeer{{PodSelector: sel("app", "nothing")}}},
				{Peers: []v1alpha1.PolicyPeer{{PodSelector: sel("app", "web")}}, Ports: []v1alpha1.PolicyPort{{Port: port(5432)}}},
			},
		}),
	}})
	d := r.Decide(web.ID, db.ID, ProtoTCP, 5432)
	if !d.Allowed() || d.Ingress.Rule == 0 {
		t.Fatalf("decision %+v: want allowed by a rule", d)
	}
	if got, want := r.Rules[d.Ingress.Rule-1].String(), "prod/db ingress[1]"; got != want {
		t.Errorf("explained by %q, want %q", got, want)
	}
	if !d.Ingress.Encrypt {
		t.Error("a Required policy's traffic is not marked for encryption")
	}
	if d.Egress.Enforced {
		t.Error("web's egress is not selected by any policy")
	}
	want := map[EnforceKey]uint32{{db.ID, Ingress}: EnforceDeny | EnforceEncrypt}
	if diff := cmp.Diff(want, r.Enforce); diff != "" {
		t.Errorf("enforce (-want +got):\n%s", diff)
	}
	if len(r.Allow) != 1 {
		t.Errorf("%d allow entries, want 1 (the rule whose peers match nothing adds none): %v", len(r.Allow), r.Allow)
	}
}

func TestBadPolicyIsSkippedWhole(t *testing.T) {
	bad := pol("prod", "bad", v1alpha1.MeshPolicySpec{
		EndpointSelector: *sel("app", "db"),
		Ingress: []v1alpha1.PolicyRule{
			{Ports: []v1alpha1.PolicyPort{{Port: port(80)}}},
			{Ports: []v1alpha1.PolicyPort{{Protocol: "SCTP"}}},
		},
	})
	r := Compile(Input{Policies: []v1alpha1.MeshPolicy{bad}, Identities: all})
	if len(r.Skipped) != 1 || len(r.Allow) != 0 || len(r.Enforce) != 0 {
		t.Fatalf("skipped %v, %d allow, %d enforce: want the whole policy skipped", r.Skipped, len(r.Allow), len(r.Enforce))
	}
}

// FuzzCompile: any policy JSON that decodes compiles without panicking, and every allow
// entry belongs to a subject that is default-deny in its direction.
func FuzzCompile(f *testing.F) {
	seed, _ := json.Marshal(v1alpha1.MeshPolicySpec{
		EndpointSelector: *sel("app", "db"),
		Ingress:          []v1alpha1.PolicyRule{{Peers: []v1alpha1.PolicyPeer{{PodSelector: sel("app", "web")}}, Ports: []v1alpha1.PolicyPort{{Port: port(5432)}}}},
		Egress:           []v1alpha1.PolicyRule{{Ports: []v1alpha1.PolicyPort{{Protocol: v1alpha1.ProtocolICMP}}}},
	})
	f.Add(seed)
	f.Add([]byte(`{"endpointSelector":{"matchExpressions":[{"key":"app","operator":"In","values":["web","db"]}]},"ingress":[{"peers":[{"namespaceSelector":{}}]}]}`))
	f.Add([]byte(`{"endpointSelector":{"matchExpressions":[{"key":"app","operator":"Bogus"}]}}`))
	f.Add([]byte(`{"endpointSelector":{},"ingress":[{"peers":[{"ipBlock":{"cidr":"10.0.0.0/8","except":["10.1.0.0/16"]}},{"entities":["host","world"]}]}]}`))
	f.Add([]byte(`{"endpointSelector":{},"egress":[{"peers":[{"ipBlock":{"cidr":"fd00::/8","except":["10.0.0.0/8"]}}]}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var spec v1alpha1.MeshPolicySpec
		if json.Unmarshal(b, &spec) != nil {
			return
		}
		r := Compile(Input{Policies: []v1alpha1.MeshPolicy{pol("prod", "f", spec)}, Identities: all, NamespaceLabels: nsl, AllowHostToLocalPods: true})
		for k := range r.Allow {
			if r.Enforce[EnforceKey{k.Subject, k.Dir}]&EnforceDeny == 0 {
				t.Fatalf("allow entry %+v for a subject that is not default-deny", k)
			}
			if k.Proto == ProtoAny && k.Port != 0 {
				t.Fatalf("entry %+v has a port without a protocol", k)
			}
		}
	})
}
