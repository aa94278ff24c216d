package main

import (
    "context"
    "io"
    
    pb "graviton/proto"
    "google.golang.org/grpc"
)

func GetBlob(ctx context.Context, client pb.BlobServiceClient, key []byte) ([]byte, error) {
    stream, err := client.GetBlob(ctx, &pb.GetBlobRequest{Key: key})
    if err != nil {
        return nil, err
    }
    
    var data []byte
    for {
        chunk, err := stream.Recv()
        if err == io.EOF {
            break
        }
        if err != nil {
            return nil, err
        }
        data = append(data, chunk.Data...)
    }
    
    return data, nil
}

func UploadBlob(ctx context.Context, client pb.UploadServiceClient, data []byte) ([]byte, error) {
    stream, err := client.Upload(ctx)
    if err != nil {
        return nil, err
    }
    
    // Start
    err = stream.Send(&pb.UploadMessage{
        Message: &pb.UploadMessage_Start{
            Start: &pb.StartUpload{TotalSize: int64(len(data))},
        },
    })
    if err != nil {
        return nil, err
    }
    
    // Chunks
    chunkSize := 1024 * 1024  // 1MB
    for i := 0; i < len(data); i += chunkSize {
        end := i + chunkSize
        if end > len(data) {
            end = len(data)
        }
        
        err = stream.Send(&pb.UploadMessage{
            Message: &pb.UploadMessage_Chunk{
                Chunk: &pb.UploadChunk{
                    Data: data[i:end],
                    Offset: int64(i),
                },
            },
        })
        if err != nil {
            return nil, err
        }
    }
    
    // Complete
    err = stream.Send(&pb.UploadMessage{
        Message: &pb.UploadMessage_Complete{
            Complete: &pb.CompleteUpload{},
        },
    })
    if err != nil {
        return nil, err
    }
    
    // Receive completion
    for {
        resp, err := stream.Recv()
        if err == io.EOF {
            break
        }
        if err != nil {
            return nil, err
        }
        
        if complete := resp.GetComplete(); complete != nil {
            return complete.Key, nil
        }
    }
    
    return nil, io.ErrUnexpectedEOF
}

// ----- Everything above this line is the seed's "Go Client", verbatim (check.py checks
// it). Below: the program's entry point, not from the seed. It sits in this file because
// the seed imports grpc without using it, and Go refuses an import that its own file
// does not use; driver.go has the rest.

func main() {
    conn, err := grpc.Dial(target(), grpc.WithInsecure())
    if err != nil {
        fail("dial: %v", err)
    }
    code := run(context.Background(), pb.NewBlobServiceClient(conn), pb.NewUploadServiceClient(conn))
    conn.Close()
    exit(code)
}
