package identity

import (
	"errors"
	"fmt"
	"strconv"
)

// Identity is a numeric security identity: clusterID<<16 | local. 0 never names an identity
// (in the datapath's policy map it means "any").
type Identity uint32

// The reserved identities, the same in every cluster (docs/datapath.md). They have no
// MeshIdentity object and are never allocated or collected.
const (
	// Host is the node itself (its host network namespace).
	Host Identity = 1
	// World is any address not otherwise known; an ipcache miss means World.
	World Identity = 2
	// Unmanaged is a pod meshcrypt does not manage (for example host-network pods).
	Unmanaged Identity = 3
	// Health is meshcrypt's own health-check endpoint.
	Health Identity = 4
	// Init is a local pod whose identity is not resolved yet.
	Init Identity = 5
	// RemoteNode is another node of the mesh.
	RemoteNode Identity = 6
)

// The local range: locals below MinLocal are reserved in every cluster; MinLocal..MaxLocal are
// allocated to label sets.
const (
	// MinLocal is the first allocatable local number.
	MinLocal = 256
	// MaxLocal is the last allocatable local number.
	MaxLocal = 65535
	// LocalSpace is the number of allocatable locals per cluster.
	LocalSpace = MaxLocal - MinLocal + 1
)

// MinCIDR is the first CIDR identity. The policy compiler numbers the CIDRs that policies
// name (ipBlock) from here to the largest uint32, node-locally and never stored in the API.
// It lies above every clusterID<<16 | local (at most 0xFFFFFF), so the two ranges never meet.
const MinCIDR Identity = 1 << 24

// IsCIDR reports whether the identity stands for a CIDR a policy names (see [MinCIDR]).
func (id Identity) IsCIDR() bool { return id >= MinCIDR }

// New returns the identity of local number local in cluster cluster.
func New(cluster uint8, local uint16) Identity {
	return Identity(cluster)<<16 | Identity(local)
}

// Cluster returns the identity's cluster ID.
func (id Identity) Cluster() uint8 { return uint8(id >> 16) }

// Local returns the identity's number within its cluster.
func (id Identity) Local() uint16 { return uint16(id) }

// IsReserved reports whether the identity's local number is below MinLocal: the reserved
// identities ([Host] ... [RemoteNode]) and the rest of the range kept for them, in any cluster.
// Reserved identities are never allocated to label sets nor garbage-collected. 0 is reserved.
func (id Identity) IsReserved() bool { return id.Local() < MinLocal }

// String returns the identity in decimal, which is also its MeshIdentity's name.
func (id Identity) String() string { return strconv.FormatUint(uint64(id), 10) }

// ErrInvalidIdentity is returned (wrapped) by [Parse] for a string that is not an identity.
var ErrInvalidIdentity = errors.New("invalid identity")

// Parse parses the decimal form that [Identity.String] returns: 1 to 4294967295 without sign,
// spaces or leading zeros (the same rule the MeshIdentity CRD applies to names).
func Parse(s string) (Identity, error) {
	if s == "" || len(s) > 10 || s[0] == '0' {
		return 0, fmt.Errorf("parse identity %q: %w", s, ErrInvalidIdentity)
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("parse identity %q: %w", s, ErrInvalidIdentity)
		}
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("parse identity %q: %w", s, ErrInvalidIdentity)
	}
	return Identity(n), nil
}
