package v1alpha1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// PolicyType is a direction a MeshPolicy enforces.
// +kubebuilder:validation:Enum=Ingress;Egress
type PolicyType string

// The policy directions.
const (
	// PolicyTypeIngress governs traffic arriving at the selected endpoints.
	PolicyTypeIngress PolicyType = "Ingress"
	// PolicyTypeEgress governs traffic leaving the selected endpoints.
	PolicyTypeEgress PolicyType = "Egress"
)

// Protocol is an IP protocol a rule names.
// +kubebuilder:validation:Enum=TCP;UDP;ICMP
type Protocol string

// The protocols; ICMP means ICMP for IPv4 and ICMPv6 for IPv6.
const (
	ProtocolTCP  Protocol = "TCP"
	ProtocolUDP  Protocol = "UDP"
	ProtocolICMP Protocol = "ICMP"
)

// PolicyEncryption says whether matching cross-node traffic must be encrypted.
// +kubebuilder:validation:Enum=Optional;Required
type PolicyEncryption string

// The encryption requirements.
const (
	// EncryptionOptional lets matching traffic follow the cluster's mode.
	EncryptionOptional PolicyEncryption = "Optional"
	// EncryptionRequired drops matching cross-node traffic whenever it could not be encrypted.
	EncryptionRequired PolicyEncryption = "Required"
)

// MeshPolicy allows traffic to and from the endpoints it selects, by the identities of their
// peers. Once any policy selects an endpoint in a direction, that direction is default-deny
// (Kubernetes NetworkPolicy semantics); rules only ever allow.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Namespaced,shortName=mp
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type MeshPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// Spec is the policy.
	Spec MeshPolicySpec `json:"spec"`
}

// MeshPolicySpec selects endpoints in the policy's namespace and lists what they may do.
type MeshPolicySpec struct {
	// EndpointSelector selects the pods of the policy's namespace it applies to; empty
	// selects every pod of the namespace.
	EndpointSelector metav1.LabelSelector `json:"endpointSelector"`
	// PolicyTypes are the directions this policy makes default-deny for the selected pods.
	// Default: Ingress, plus Egress when egress rules are given.
	// +kubebuilder:validation:MaxItems=2
	// +listType=set
	// +optional
	PolicyTypes []PolicyType `json:"policyTypes,omitempty"`
	// Ingress rules allow traffic to the selected pods.
	// +kubebuilder:validation:MaxItems=64
	// +optional
	Ingress []PolicyRule `json:"ingress,omitempty"`
	// Egress rules allow traffic from the selected pods.
	// +kubebuilder:validation:MaxItems=64
	// +optional
	Egress []PolicyRule `json:"egress,omitempty"`
	// Encryption Required drops matching cross-node traffic of the selected pods whenever it
	// could not be encrypted (no ready peer, mode Disabled).
	// +kubebuilder:default=Optional
	// +optional
	Encryption PolicyEncryption `json:"encryption,omitempty"`
}

// PolicyRule allows traffic with any of its peers on any of its ports. No peers means every
// peer; no ports means every port and protocol.
type PolicyRule struct {
	// Peers are the other ends: to (egress) or from (ingress).
	// +kubebuilder:validation:MaxItems=32
	// +optional
	Peers []PolicyPeer `json:"peers,omitempty"`
	// Ports are the destination ports and protocols.
	// +kubebuilder:validation:MaxItems=32
	// +optional
	Ports []PolicyPort `json:"ports,omitempty"`
}

// PolicyPeer is the other end of a rule: exactly one of workloads selected by labels and
// namespace (and, with the cluster mesh, cluster), entities, or an IP block. Both selectors
// set means pods matching podSelector in namespaces matching namespaceSelector; only
// podSelector means the policy's own namespace.
// +kubebuilder:validation:XValidation:rule="[has(self.podSelector) || has(self.namespaceSelector), has(self.entities), has(self.ipBlock)].filter(k, k).size() == 1",message="a peer is exactly one of: podSelector and/or namespaceSelector, entities, ipBlock"
type PolicyPeer struct {
	// PodSelector selects pods by their labels.
	// +optional
	PodSelector *metav1.LabelSelector `json:"podSelector,omitempty"`
	// NamespaceSelector selects namespaces by their labels.
	// +optional
	NamespaceSelector *metav1.LabelSelector `json:"namespaceSelector,omitempty"`
	// Entities name endpoints that labels cannot select: host (this node: kubelet probes,
	// hostNetwork pods), remote-node (the other nodes of the cluster), world (every address
	// that is not a known pod or node, which includes every ipBlock), cluster (every pod of
	// this cluster), all (any peer at all).
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=5
	// +listType=set
	// +optional
	Entities []Entity `json:"entities,omitempty"`
	// IPBlock selects addresses by CIDR, with exceptions, as Kubernetes NetworkPolicy's
	// ipBlock: meant for addresses outside the cluster; pod and node addresses keep their own
	// identities and are selected by selectors and entities.
	// +optional
	IPBlock *IPBlock `json:"ipBlock,omitempty"`
}

// Entity names a group of endpoints that labels cannot select.
// +kubebuilder:validation:Enum=host;remote-node;world;cluster;all
type Entity string

// The entities.
const (
	// EntityHost is the node the selected pod runs on (reserved identity host).
	EntityHost Entity = "host"
	// EntityRemoteNode is any other node of the cluster (reserved identity remote-node).
	EntityRemoteNode Entity = "remote-node"
	// EntityWorld is any address that is not a known pod or node: reserved identity world
	// and every ipBlock's addresses.
	EntityWorld Entity = "world"
	// EntityCluster is every pod of this cluster.
	EntityCluster Entity = "cluster"
	// EntityAll is any peer.
	EntityAll Entity = "all"
)

// IPBlock is a CIDR and the parts of it that are excluded.
// +kubebuilder:validation:XValidation:rule="!has(self.except) || !isCIDR(self.cidr) || self.except.all(e, !isCIDR(e) || (cidr(self.cidr).containsCIDR(e) && cidr(e).prefixLength() > cidr(self.cidr).prefixLength()))",message="ipBlock.except: every entry must be a CIDR strictly inside ipBlock.cidr",fieldPath=".except"
type IPBlock struct {
	// CIDR is an IPv4 or IPv6 block, such as 192.0.2.0/24 or 2001:db8::/32, host bits
	// clear.
	// +kubebuilder:validation:MaxLength=64
	// +kubebuilder:validation:XValidation:rule="isCIDR(self)",message="ipBlock.cidr must be a CIDR such as 192.0.2.0/24 or 2001:db8::/32"
	// +kubebuilder:validation:XValidation:rule="!isCIDR(self) || cidr(self) == cidr(self).masked()",message="ipBlock.cidr must not have host bits set"
	CIDR string `json:"cidr"`
	// Except are CIDRs strictly inside CIDR that the block does not select.
	// +kubebuilder:validation:MaxItems=32
	// +kubebuilder:validation:items:MaxLength=64
	// +kubebuilder:validation:items:XValidation:rule="isCIDR(self)",message="ipBlock.except entries must be CIDRs such as 192.0.2.128/25"
	// +kubebuilder:validation:items:XValidation:rule="!isCIDR(self) || cidr(self) == cidr(self).masked()",message="ipBlock.except entries must not have host bits set"
	// +optional
	Except []string `json:"except,omitempty"`
}

// PolicyPort is a destination port and protocol.
// +kubebuilder:validation:XValidation:rule="!has(self.port) || self.protocol != 'ICMP'",message="ICMP has no ports"
type PolicyPort struct {
	// Protocol is TCP, UDP or ICMP.
	// +kubebuilder:default=TCP
	// +optional
	Protocol Protocol `json:"protocol,omitempty"`
	// Port is the destination port; unset means every port of the protocol.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	// +optional
	Port *int32 `json:"port,omitempty"`
}

// MeshPolicyList is a list of MeshPolicy.
//
// +kubebuilder:object:root=true
type MeshPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	// Items are the listed objects.
	Items []MeshPolicy `json:"items"`
}
