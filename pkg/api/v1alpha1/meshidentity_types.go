package v1alpha1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// MeshIdentity binds a numeric security identity to a canonical label set. Its name is the
// identity in decimal (clusterID<<16 | local); agents create it with create-if-absent, so every
// agent of the cluster agrees on every number. It is immutable.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=mid
// +kubebuilder:validation:XValidation:rule="self.metadata.name.matches('^[1-9][0-9]{0,9}$')",message="the name is the numeric identity in decimal"
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type MeshIdentity struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// Spec is the identity's label set.
	Spec MeshIdentitySpec `json:"spec"`
}

// MeshIdentitySpec is the canonical label set of an identity.
// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="an identity's labels are immutable"
type MeshIdentitySpec struct {
	// Labels is the canonical label set: the pod's labels less churn labels, plus
	// meshcrypt.io/namespace, meshcrypt.io/serviceaccount and meshcrypt.io/cluster.
	// +kubebuilder:validation:MaxProperties=64
	Labels map[string]string `json:"labels"`
}

// MeshIdentityList is a list of MeshIdentity.
//
// +kubebuilder:object:root=true
type MeshIdentityList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	// Items are the listed objects.
	Items []MeshIdentity `json:"items"`
}
