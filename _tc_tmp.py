import labelers, time
t=time.time()
import open_clip, torch
print("import", time.time()-t)
t=time.time()
from pipelines.zoo.clip import build_clip
build_clip("/tmp/cz")
print("build", time.time()-t)
m, pre = open_clip.create_model_from_pretrained("local-dir:/tmp/cz")
tok = open_clip.get_tokenizer("local-dir:/tmp/cz")
print(type(tok).__name__, sum(p.numel() for p in m.parameters()), pre)
from PIL import Image
x=torch.stack([pre(Image.new("RGB",(64,64),c)) for c in ["red","blue"]])
t=time.time()
with torch.no_grad():
    print(m.encode_image(x).shape, m.encode_text(tok(["a cat","a dog"])).shape)
print(time.time()-t)
