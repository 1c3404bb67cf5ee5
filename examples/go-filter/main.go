// A proxy-wasm filter in Go with no SDK: the host calls and exports the Go
// proxy-wasm SDK (proxy-wasm-go-sdk, Go 1.24+ `wasip1`) wraps, declared with
// //go:wasmimport and //go:wasmexport. It pulls in what a Go filter's runtime
// needs from the host (fmt and os on stdout, the garbage collector, a timer
// sleep), so it shows a Go filter loads and runs in Sluice as on Envoy.
//
//	GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -o go_filter.wasm .
//
// Behaviour (checked by scripts/go-compat.sh):
//   - every request: `x-go-path: <:path>` added upstream; a line on stdout;
//   - `/go/deny`: a 403 local response, "denied by a Go filter\n";
//   - `/go/sleep`: a 1 ms time.Sleep and a forced GC before continuing;
//   - every response: `x-go-filter: <plugin configuration>`.
package main

import (
	"fmt"
	"os"
	"runtime"
	"time"
	"unsafe"
)

//go:wasmimport env proxy_log
func proxyLog(level uint32, msg unsafe.Pointer, size uint32) uint32

//go:wasmimport env proxy_get_buffer_bytes
func proxyGetBufferBytes(kind, start, max uint32, retData, retSize unsafe.Pointer) uint32

//go:wasmimport env proxy_get_header_map_value
func proxyGetHeaderMapValue(mapType uint32, key unsafe.Pointer, keySize uint32, retData, retSize unsafe.Pointer) uint32

//go:wasmimport env proxy_add_header_map_value
func proxyAddHeaderMapValue(mapType uint32, key unsafe.Pointer, keySize uint32, value unsafe.Pointer, valueSize uint32) uint32

//go:wasmimport env proxy_send_local_response
func proxySendLocalResponse(status uint32, details unsafe.Pointer, detailsSize uint32, body unsafe.Pointer, bodySize uint32, headers unsafe.Pointer, headersSize uint32, grpcStatus int32) uint32

const (
	mapRequestHeaders  = 0
	mapResponseHeaders = 2
	bufferPluginConfig = 7
	logInfo            = 2
)

// Buffers handed to the host by proxy_on_memory_allocate, kept alive (and
// found again) by address until the filter takes them back.
var allocs = map[uint32][]byte{}

//go:wasmexport proxy_abi_version_0_2_1
func abiVersion() {}

//go:wasmexport proxy_on_memory_allocate
func onMemoryAllocate(size uint32) unsafe.Pointer {
	b := make([]byte, size+1) // never empty: its address is the pointer
	p := unsafe.Pointer(&b[0])
	allocs[uint32(uintptr(p))] = b[:size]
	return p
}

// take returns what the host wrote through a (retData, retSize) pair.
func take(ptr, size uint32) []byte {
	b, ok := allocs[ptr]
	if !ok {
		return nil
	}
	delete(allocs, ptr)
	return b[:size]
}

func ptr(b []byte) unsafe.Pointer {
	if len(b) == 0 {
		return nil
	}
	return unsafe.Pointer(&b[0])
}

func log(msg string) {
	b := []byte(msg)
	proxyLog(logInfo, ptr(b), uint32(len(b)))
}

var pluginConfig = "none"

//go:wasmexport proxy_on_context_create
func onContextCreate(id, root uint32) {}

//go:wasmexport proxy_on_vm_start
func onVMStart(root, size uint32) uint32 { return 1 }

//go:wasmexport proxy_on_configure
func onConfigure(root, size uint32) uint32 {
	var p, n uint32
	if size > 0 && proxyGetBufferBytes(bufferPluginConfig, 0, size, unsafe.Pointer(&p), unsafe.Pointer(&n)) == 0 {
		pluginConfig = string(take(p, n))
	}
	log(fmt.Sprintf("go filter configured: %q", pluginConfig))
	return 1
}

func requestHeader(name string) string {
	key := []byte(name)
	var p, n uint32
	if proxyGetHeaderMapValue(mapRequestHeaders, ptr(key), uint32(len(key)), unsafe.Pointer(&p), unsafe.Pointer(&n)) != 0 {
		return ""
	}
	return string(take(p, n))
}

func addHeader(mapType uint32, name, value string) {
	k, v := []byte(name), []byte(value)
	proxyAddHeaderMapValue(mapType, ptr(k), uint32(len(k)), ptr(v), uint32(len(v)))
}

//go:wasmexport proxy_on_request_headers
func onRequestHeaders(id, headers, endOfStream uint32) uint32 {
	path := requestHeader(":path")
	fmt.Fprintf(os.Stdout, "go filter: request %d for %s\n", id, path)
	switch path {
	case "/go/deny":
		body := []byte("denied by a Go filter\n")
		empty := []byte{0, 0, 0, 0} // a serialized map with no pairs
		proxySendLocalResponse(403, nil, 0, ptr(body), uint32(len(body)), ptr(empty), 4, -1)
		return 1
	case "/go/sleep":
		time.Sleep(time.Millisecond)
		garbage := make([][]byte, 0, 64)
		for i := 0; i < 64; i++ {
			garbage = append(garbage, make([]byte, 64<<10))
		}
		runtime.GC()
		_ = garbage
	}
	addHeader(mapRequestHeaders, "x-go-path", path)
	return 0
}

//go:wasmexport proxy_on_response_headers
func onResponseHeaders(id, headers, endOfStream uint32) uint32 {
	addHeader(mapResponseHeaders, "x-go-filter", pluginConfig)
	return 0
}

//go:wasmexport proxy_on_log
func onLog(id uint32) {}

//go:wasmexport proxy_on_done
func onDone(id uint32) uint32 { return 1 }

//go:wasmexport proxy_on_delete
func onDelete(id uint32) {}

func main() {}
