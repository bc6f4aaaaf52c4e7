package v1alpha1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// IP is an IPv4 or IPv6 address in its usual text form.
// +kubebuilder:validation:MaxLength=45
// +kubebuilder:validation:XValidation:rule="isIP(self)",message="must be an IPv4 or IPv6 address"
type IP string

// CIDR is an IPv4 or IPv6 prefix with no host bits set, such as 10.244.1.0/24.
// +kubebuilder:validation:MaxLength=49
// +kubebuilder:validation:XValidation:rule="isCIDR(self)",message="must be a CIDR such as 10.244.1.0/24 or fd44::/64"
// +kubebuilder:validation:XValidation:rule="!isCIDR(self) || cidr(self) == cidr(self).masked()",message="must not have host bits set"
type CIDR string

// WireGuardBackend says which WireGuard implementation a node runs.
// +kubebuilder:validation:Enum=kernel;userspace
type WireGuardBackend string

// The WireGuard backends.
const (
	// BackendKernel is the kernel's WireGuard module, configured through netlink.
	BackendKernel WireGuardBackend = "kernel"
	// BackendUserspace is the embedded wireguard-go device in its own process.
	BackendUserspace WireGuardBackend = "userspace"
)

// Condition types of MeshNode status.
const (
	// ConditionReady is true when the agent has applied the cluster's configuration.
	ConditionReady = "Ready"
	// ConditionEncrypted is true when encryption is on and every known peer is configured.
	ConditionEncrypted = "Encrypted"
	// ConditionDegraded is true when the agent skipped input it could not use.
	ConditionDegraded = "Degraded"
)

// MeshNode is what one node's agent announces about itself: where its tunnels end, which pod
// CIDRs it holds and its public key. It is cluster-scoped, named after the Kubernetes node,
// and written only by that node's agent.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=mn
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Mode",type=string,JSONPath=`.status.mode`
// +kubebuilder:printcolumn:name="Backend",type=string,JSONPath=`.status.backend`
// +kubebuilder:printcolumn:name="Peers",type=integer,JSONPath=`.status.peersReady`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type MeshNode struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// Spec is what the node announces.
	Spec MeshNodeSpec `json:"spec"`
	// Status is what the node's agent observed and applied.
	// +optional
	Status MeshNodeStatus `json:"status,omitempty"`
}

// MeshNodeSpec is what a node announces to its peers.
type MeshNodeSpec struct {
	// UnderlayIPs are the node's addresses on the network between nodes, where tunnels end:
	// at most one IPv4 and one IPv6 address.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=2
	// +listType=set
	UnderlayIPs []IP `json:"underlayIPs"`
	// PodCIDRs are the node's pod address ranges, from the Kubernetes Node's spec.podCIDRs.
	// +kubebuilder:validation:MaxItems=8
	// +listType=set
	// +optional
	PodCIDRs []CIDR `json:"podCIDRs,omitempty"`
	// WireGuard is the node's WireGuard endpoint.
	// +optional
	WireGuard *WireGuardSpec `json:"wireguard,omitempty"`
	// IPsec is the node's IPsec identity and the keys it can receive with.
	// +optional
	IPsec *IPsecSpec `json:"ipsec,omitempty"`
	// BootID identifies the node's current boot; it changes when the node reboots.
	// +kubebuilder:validation:MaxLength=64
	// +optional
	BootID string `json:"bootID,omitempty"`
	// HealthIPs are the addresses of the node's health endpoint, one per pod CIDR family:
	// `meshcrypt verify` probes travel between health endpoints as pod traffic does.
	// +kubebuilder:validation:MaxItems=2
	// +listType=set
	// +optional
	HealthIPs []IP `json:"healthIPs,omitempty"`
	// Endpoints are the node's pods' addresses with their identities, for the agents of
	// other clusters in the mesh, which see this cluster's MeshNodes and MeshIdentities but
	// not its pods.
	// +kubebuilder:validation:MaxItems=4096
	// +listType=map
	// +listMapKey=ip
	// +optional
	Endpoints []Endpoint `json:"endpoints,omitempty"`
	// NodeEncryption is true when the node encrypts host traffic (MeshConfig
	// spec.encryption.nodeEncryption, not opted out): it accepts the other nodes' underlay
	// addresses through its WireGuard tunnel, so they may route its addresses into theirs.
	// +optional
	NodeEncryption bool `json:"nodeEncryption,omitempty"`
}

// Endpoint is a pod address and its identity.
type Endpoint struct {
	// IP is the pod's address.
	IP IP `json:"ip"`
	// Identity is the pod's numeric identity (a MeshIdentity's name).
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=16777215
	Identity int64 `json:"identity"`
}

// WireGuardSpec is a node's WireGuard endpoint.
type WireGuardSpec struct {
	// PublicKey is the node's WireGuard public key: 32 bytes, base64.
	// +kubebuilder:validation:Pattern=`^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$`
	PublicKey string `json:"publicKey"`
	// ListenPort is the UDP port the node's WireGuard device listens on.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	ListenPort int32 `json:"listenPort"`
	// KeyCreated is when the node's key was generated: its age for rotation.
	// +optional
	KeyCreated *metav1.MicroTime `json:"keyCreated,omitempty"`
}

// IPsecSpec is what a node announces for mode IPsec.
type IPsecSpec struct {
	// NodeID is the node's IPsec node ID, unique in the cluster: part of every SPI and of
	// the per-pair key derivation. The agent picks it and moves off a collision.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	NodeID int32 `json:"nodeID"`
	// SPIs are the keyring SPIs the node has installed inbound states for, towards every
	// peer it knows. Peers switch their outbound traffic to a new SPI only when every node
	// lists it.
	// +kubebuilder:validation:MaxItems=15
	// +listType=set
	// +optional
	SPIs []int32 `json:"spis,omitempty"`
}

// MeshNodeStatus is what a node's agent observed and applied.
type MeshNodeStatus struct {
	// Conditions are Ready, Encrypted and Degraded.
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// Mode is the encryption mode the agent has applied.
	// +optional
	Mode EncryptionMode `json:"mode,omitempty"`
	// Strict is true when the agent drops pod traffic to remote nodes without a ready tunnel.
	// +optional
	Strict bool `json:"strict,omitempty"`
	// Backend is the WireGuard implementation in use.
	// +optional
	Backend WireGuardBackend `json:"backend,omitempty"`
	// AttachMode is how the policy classifier is attached to pod interfaces: tcx (Linux 6.6+)
	// or tc (clsact qdisc with cls_bpf filters).
	// +kubebuilder:validation:Enum=tcx;tc
	// +optional
	AttachMode string `json:"attachMode,omitempty"`
	// TunnelMTU is the MTU of the node's WireGuard device: the underlay MTU less the
	// tunnel overhead. Pod interfaces should not exceed it.
	// +optional
	TunnelMTU int32 `json:"tunnelMTU,omitempty"`
	// MonitorAddress is where the agent serves its flow events (GET /flows, as JSON lines;
	// `meshcrypt monitor` reads them): host:port on the node's network. Unset when the agent
	// serves no flow events.
	// +kubebuilder:validation:MaxLength=64
	// +optional
	MonitorAddress string `json:"monitorAddress,omitempty"`
	// PeersReady counts the peers configured with their current key, endpoint and pod CIDRs.
	// +optional
	PeersReady int32 `json:"peersReady,omitempty"`
	// Peers is the state of each configured peer.
	// +listType=map
	// +listMapKey=node
	// +optional
	Peers []PeerStatus `json:"peers,omitempty"`
	// IPsec is the state of the node's ESP states in mode IPsec.
	// +optional
	IPsec *IPsecStatus `json:"ipsec,omitempty"`
	// RemoteClusters is the node's view of each remote cluster of the mesh.
	// +listType=map
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=254
	// +optional
	RemoteClusters []RemoteClusterStatus `json:"remoteClusters,omitempty"`
}

// RemoteClusterState is how a node sees a remote cluster.
// +kubebuilder:validation:Enum=Connected;Unreachable;Refused
type RemoteClusterState string

// The remote cluster states.
const (
	// RemoteConnected: the remote API server answers and its MeshNodes are imported.
	RemoteConnected RemoteClusterState = "Connected"
	// RemoteUnreachable: the remote API server does not answer (or the kubeconfig is
	// missing or wrong); the nodes imported before stay configured.
	RemoteUnreachable RemoteClusterState = "Unreachable"
	// RemoteRefused: the remote announces something this node will not route (a pod CIDR
	// overlapping a local or another remote one); the message says what.
	RemoteRefused RemoteClusterState = "Refused"
)

// RemoteClusterStatus is a node's view of one remote cluster.
type RemoteClusterStatus struct {
	// Name is the remote cluster's name in MeshConfig.
	Name string `json:"name"`
	// State is Connected, Unreachable or Refused.
	State RemoteClusterState `json:"state"`
	// Message says why a remote is Unreachable or Refused.
	// +kubebuilder:validation:MaxLength=1024
	// +optional
	Message string `json:"message,omitempty"`
	// Nodes counts the remote MeshNodes imported; NodesRefused those refused (overlapping
	// pod CIDRs).
	// +optional
	Nodes int32 `json:"nodes,omitempty"`
	// +optional
	NodesRefused int32 `json:"nodesRefused,omitempty"`
	// Identities counts the remote MeshIdentities imported.
	// +optional
	Identities int32 `json:"identities,omitempty"`
	// PeersReady counts the remote nodes configured as peers with their current key.
	// +optional
	PeersReady int32 `json:"peersReady,omitempty"`
	// LastSync is when the node last heard from the remote API server.
	// +optional
	LastSync *metav1.Time `json:"lastSync,omitempty"`
}

// IPsecStatus is the state of a node's IPsec data path.
type IPsecStatus struct {
	// OutboundSPI is the keyring SPI the node encrypts with.
	// +optional
	OutboundSPI int32 `json:"outboundSPI,omitempty"`
	// Algorithm is the outbound key's algorithm, e.g. rfc4106(gcm(aes)).
	// +optional
	Algorithm string `json:"algorithm,omitempty"`
	// States counts the ESP states (keys) installed, inbound and outbound.
	// +optional
	States int32 `json:"states,omitempty"`
	// HighestSequence is the highest ESP sequence number any outbound state has used.
	// +optional
	HighestSequence int64 `json:"highestSequence,omitempty"`
	// SequenceLimit is the sequence number where a state stops sending: rotate keys well
	// before HighestSequence reaches it.
	// +optional
	SequenceLimit int64 `json:"sequenceLimit,omitempty"`
	// XFRMErrors are the non-zero XFRM error counters of the node (/proc/net/xfrm_stat).
	// +optional
	XFRMErrors map[string]int64 `json:"xfrmErrors,omitempty"`
}

// PeerStatus is the state of one peer: a WireGuard peer as the node's device reports it, or
// in mode IPsec a node this node encrypts to.
type PeerStatus struct {
	// Node is the peer's node name; a remote cluster's node is named cluster/node.
	Node string `json:"node"`
	// PublicKey is the WireGuard public key the peer is configured with.
	// +optional
	PublicKey string `json:"publicKey,omitempty"`
	// OutboundSPI is, in mode IPsec, the keyring SPI of the outbound state towards the peer.
	// +optional
	OutboundSPI int32 `json:"outboundSPI,omitempty"`
	// Endpoint is the peer's underlay address and port.
	// +optional
	Endpoint string `json:"endpoint,omitempty"`
	// LastHandshakeTime is the time of the last completed handshake, unset if none yet.
	// (Byte counters change with every packet and belong in metrics, not in the API.)
	// +optional
	LastHandshakeTime *metav1.Time `json:"lastHandshakeTime,omitempty"`
}

// MeshNodeList is a list of MeshNode.
//
// +kubebuilder:object:root=true
type MeshNodeList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	// Items are the listed objects.
	Items []MeshNode `json:"items"`
}
