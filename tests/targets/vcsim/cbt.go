// Changed-block tracking for govmomi's simulator, which has none (no change IDs, and
// QueryChangedDiskAreas answers MethodNotFound), so that lifeboat's vSphere source can be tested
// against the API it uses on a real vCenter:
//
//   - when a snapshot of a VM with changeTrackingEnabled is created, each of its flat disks gets a
//     change ID ("DISK/SEQ", DISK naming the disk's file) in its backing, as ESXi does, and the
//     simulator keeps a copy of the disk's data at that ID;
//   - QueryChangedDiskAreas(snapshot, deviceKey, startOffset, changeId) answers the 64 KiB blocks
//     that differ between the disk at changeId and the disk at the snapshot's change ID ("*": every
//     block holding data), and an InvalidArgument fault for a change ID the disk never had (another
//     disk's, or one from before a reset), as vCenter does.
//
// In the simulator, a VM's disk changes only when its datastore file is written (the VMs run
// nothing), so comparing copies is an exact stand-in for ESXi's change tracking.
package main

import (
	"bytes"
	"crypto/sha1"
	"encoding/hex"
	"encoding/xml"
	"fmt"
	"io"
	"io/ioutil"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

const cbtBlock = 64 << 10

type cbt struct {
	mu  sync.Mutex
	dir string // the disks' data at each change ID
	seq int
}

var extentLine = regexp.MustCompile(`(?m)^(?:RW|RDONLY) \d+ (?:VMFS|FLAT) "([^"]+)"`)

func (c *cbt) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "LifeboatCBT", Value: "cbt"}
}

func (c *cbt) UpdateObject(mo.Reference, []types.PropertyChange) {}

func (c *cbt) RemoveObject(types.ManagedObjectReference) {}

// PutObject gives the disks of a new snapshot their change IDs.
func (c *cbt) PutObject(obj mo.Reference) {
	snap, ok := obj.(*simulator.VirtualMachineSnapshot)
	if !ok {
		return
	}
	vm, ok := simulator.Map.Get(snap.Vm).(*simulator.VirtualMachine)
	if !ok || vm.Config == nil || vm.Config.ChangeTrackingEnabled == nil || !*vm.Config.ChangeTrackingEnabled {
		return
	}
	for _, dev := range snap.Config.Hardware.Device {
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		backing, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		data, err := flatFile(backing.FileName)
		if err != nil {
			os.Stderr.WriteString("vcsim cbt: " + err.Error() + "\n")
			continue
		}
		c.mu.Lock()
		c.seq++
		id := fmt.Sprintf("%s/%d", diskID(backing.FileName), c.seq)
		c.mu.Unlock()
		if err := copyFile(data, c.copyOf(id)); err != nil {
			os.Stderr.WriteString("vcsim cbt: " + err.Error() + "\n")
			continue
		}
		backing.ChangeId = id
	}
}

func diskID(fileName string) string {
	sum := sha1.Sum([]byte(fileName))
	return hex.EncodeToString(sum[:8])
}

func (c *cbt) copyOf(id string) string {
	return filepath.Join(c.dir, strings.ReplaceAll(id, "/", "-"))
}

// flatFile is the local file holding the data of the disk "[DATASTORE] PATH.vmdk".
func flatFile(fileName string) (string, error) {
	var p struct{ ds, path string }
	if i := strings.Index(fileName, "] "); strings.HasPrefix(fileName, "[") && i > 0 {
		p.ds, p.path = fileName[1:i], fileName[i+2:]
	} else {
		return "", fmt.Errorf("not a datastore path: %s", fileName)
	}
	for _, e := range simulator.Map.All("Datastore") {
		ds := e.(*simulator.Datastore)
		if ds.Name != p.ds {
			continue
		}
		local := filepath.Join(ds.Info.GetDatastoreInfo().Url, p.path)
		head := make([]byte, 4096)
		f, err := os.Open(local)
		if err != nil {
			return "", err
		}
		n, _ := io.ReadFull(f, head)
		f.Close()
		if m := extentLine.FindSubmatch(head[:n]); bytes.HasPrefix(head, []byte("# Disk DescriptorFile")) && m != nil {
			return filepath.Join(filepath.Dir(local), string(m[1])), nil
		}
		return local, nil
	}
	return "", fmt.Errorf("no datastore %s", p.ds)
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// serve answers QueryChangedDiskAreas and hands every other request to next.
func (c *cbt) serve(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || !strings.HasSuffix(r.URL.Path, "/sdk") {
			next.ServeHTTP(w, r)
			return
		}
		body, err := ioutil.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if !bytes.Contains(body, []byte("<QueryChangedDiskAreas")) {
			r.Body = ioutil.NopCloser(bytes.NewReader(body))
			next.ServeHTTP(w, r)
			return
		}
		var env struct {
			Body struct {
				Req types.QueryChangedDiskAreasRequestType `xml:"QueryChangedDiskAreas"`
			} `xml:"Body"`
		}
		if err := xml.Unmarshal(body, &env); err != nil {
			soapFault(w, "InvalidRequest", "", err.Error())
			return
		}
		info, property, msg := c.query(&env.Body.Req)
		if msg != "" {
			soapFault(w, "InvalidArgument", property, msg)
			return
		}
		var out bytes.Buffer
		fmt.Fprintf(&out, `<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><QueryChangedDiskAreasResponse xmlns="urn:vim25"><returnval><startOffset>%d</startOffset><length>%d</length>`, info.StartOffset, info.Length)
		for _, a := range info.ChangedArea {
			fmt.Fprintf(&out, `<changedArea><start>%d</start><length>%d</length></changedArea>`, a.Start, a.Length)
		}
		out.WriteString(`</returnval></QueryChangedDiskAreasResponse></soapenv:Body></soapenv:Envelope>`)
		w.Header().Set("Content-Type", "text/xml; charset=utf-8")
		_, _ = w.Write(out.Bytes())
	})
}

func soapFault(w http.ResponseWriter, kind, property, msg string) {
	var detail bytes.Buffer
	_ = xml.EscapeText(&detail, []byte(msg))
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>%s</faultstring><detail><%sFault xmlns="urn:vim25" xsi:type="%s"><invalidProperty>%s</invalidProperty></%sFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>`,
		detail.String(), kind, kind, property, kind)
}

// query compares the disk's data at req.ChangeId with its data at the snapshot's change ID.
func (c *cbt) query(req *types.QueryChangedDiskAreasRequestType) (types.DiskChangeInfo, string, string) {
	var info types.DiskChangeInfo
	if req.Snapshot == nil {
		return info, "snapshot", "a snapshot is required"
	}
	snap, ok := simulator.Map.Get(*req.Snapshot).(*simulator.VirtualMachineSnapshot)
	if !ok {
		return info, "snapshot", "no such snapshot: " + req.Snapshot.Value
	}
	var backing *types.VirtualDiskFlatVer2BackingInfo
	for _, dev := range snap.Config.Hardware.Device {
		if disk, ok := dev.(*types.VirtualDisk); ok && disk.Key == req.DeviceKey {
			backing, _ = disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		}
	}
	if backing == nil {
		return info, "deviceKey", fmt.Sprintf("no flat disk with key %d", req.DeviceKey)
	}
	if backing.ChangeId == "" {
		return info, "changeId", "changed block tracking was not enabled when the snapshot was taken"
	}
	cur, err := ioutil.ReadFile(c.copyOf(backing.ChangeId))
	if err != nil {
		return info, "changeId", err.Error()
	}
	var old []byte
	if req.ChangeId != "*" {
		if !strings.HasPrefix(req.ChangeId, diskID(backing.FileName)+"/") {
			return info, "changeId", "change ID " + req.ChangeId + " is not one of this disk's"
		}
		old, err = ioutil.ReadFile(c.copyOf(req.ChangeId))
		if err != nil {
			return info, "changeId", "unknown change ID " + req.ChangeId
		}
	}
	size := int64(len(cur))
	info.StartOffset = req.StartOffset
	info.Length = size - req.StartOffset
	for at := req.StartOffset - req.StartOffset%cbtBlock; at < size; at += cbtBlock {
		end := at + cbtBlock
		if end > size {
			end = size
		}
		block := cur[at:end]
		var changed bool
		if old == nil {
			changed = !bytes.Equal(block, make([]byte, len(block)))
		} else {
			changed = int64(len(old)) < end || !bytes.Equal(block, old[at:end])
		}
		if !changed {
			continue
		}
		n := len(info.ChangedArea)
		if n > 0 && info.ChangedArea[n-1].Start+info.ChangedArea[n-1].Length == at {
			info.ChangedArea[n-1].Length += end - at
		} else {
			info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: at, Length: end - at})
		}
	}
	return info, "", ""
}
